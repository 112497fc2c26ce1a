"""An Airflow DAG that runs a Twinline job (documentation: Twinline does not depend on Airflow).

Exit codes (README): 0 ok, 3 ok with quarantined units, 5 source unavailable and 6
lock held (retry), 2 config error and 4 gate failed (a person must look).
"""

from datetime import datetime, timedelta

from airflow import DAG
from airflow.exceptions import AirflowException, AirflowSkipException
from airflow.operators.python import PythonOperator


def run_twinline_job(config: str, **_):
    import subprocess

    proc = subprocess.run(["/opt/twinline/.venv/bin/twin", "run", "--config", config, "--log-format", "json"],
                          env={"TWIN_KEY_FILE": "/etc/twinline/key", "PATH": "/usr/bin:/bin"})
    if proc.returncode in (0, 3):
        return proc.returncode
    if proc.returncode in (5, 6):
        raise AirflowException(f"retry later (exit {proc.returncode})")  # Airflow retries the task
    if proc.returncode == 4:
        raise AirflowSkipException("the gate failed: twins not built; read the report")
    raise AirflowException(f"twin run failed with exit {proc.returncode}: fix the configuration")


with DAG(
    dag_id="twinline_nightly",
    start_date=datetime(2026, 1, 1),
    schedule="15 2 * * *",
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 3, "retry_delay": timedelta(minutes=20)},
) as dag:
    PythonOperator(task_id="twin_run", python_callable=run_twinline_job,
                   op_kwargs={"config": "/etc/twinline/nightly.toml"})
