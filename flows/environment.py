"""Process-wide defaults set before Prefect, MLflow or DVC are imported.

Prefect reads its settings at import time, so this runs first: state stays in
the project (not ~/.prefect), telemetry is off, and the temporary local server
gets enough time to start on a slow machine.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",  # stdout holds the JSON summary alone, tracking server or not
    # MLflow's INFO lines ("Creating initial MLflow database tables", "Validating input example against model
    # signature") tell a user nothing to act on; its warnings and errors still show.
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    "DVC_NO_ANALYTICS": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def configure(project_root: str | Path = ".", prefect_home: str = ".prefect") -> None:
    """Set the defaults the user has not set already."""
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("PREFECT_HOME", str((Path(project_root) / prefect_home).resolve()))
