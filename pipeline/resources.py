"""Where the declarative files (mappings/, schemas/, config/) are found.

They live beside the package in the repository, which is where an editable install
(the Quickstart) finds them. `TWIN_HOME` points elsewhere, for a deployment that keeps
its own mappings.
"""

from __future__ import annotations

import os
from pathlib import Path


def project_home() -> Path:
    env = os.environ.get("TWIN_HOME")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent


def mappings_dir() -> Path:
    return project_home() / "mappings"


def schemas_dir() -> Path:
    return project_home() / "schemas"


def config_dir() -> Path:
    return project_home() / "config"
