"""Environment defaults the project sets so users never have to (telemetry off, slow-core friendly timeouts).

Only `setdefault`: a user's explicit setting always wins.
"""
from __future__ import annotations

import os
from pathlib import Path

_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "true",               # MLflow honours "true", not "1"
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_UPDATE_DOWNLOAD_COUNTS": "0",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",  # the default 20 s times out on 2 busy cores
    "PREFECT_LOGGING_TO_API_BATCH_INTERVAL": "0.3",
    "TOKENIZERS_PARALLELISM": "false",
    "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "false",  # the artifact store is the only cache: no pickled results
    "GIT_PYTHON_REFRESH": "quiet",
}


def project_home() -> Path:
    """Folder for local state (.sftcurate/ in the working directory unless SFTCURATE_HOME says otherwise)."""
    return Path(os.environ.get("SFTCURATE_HOME", ".sftcurate")).resolve()


def apply_environment_defaults() -> None:
    """Environment variables only: nothing is created on disk until a run needs it (`ensure_home`)."""
    for key, value in _DEFAULTS.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("PREFECT_HOME", str(project_home() / "prefect"))


def ensure_home() -> Path:
    """Create the local state folder; called by the entry points that write there (CLI, flows)."""
    home = project_home()
    home.mkdir(parents=True, exist_ok=True)
    return home
