"""Engines: where the pipeline's pure functions run.

The single process (pipeline.imports, pipeline.twins) is the default and needs nothing
here. `spark` runs the same mappers and twin build over partitions of the input on an
Apache Spark cluster (or `local[N]`) and writes the same Delta tables; see docs/spark.md.
Nothing in this package is imported unless `--engine spark` asks for it, so the
single process pays no start-up cost for it.
"""

ENGINES = ("single", "spark")
