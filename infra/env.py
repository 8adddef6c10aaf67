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


PROJECT_FOLDER = ".sftcurate"


def project_local_home() -> Path | None:
    """A `.sftcurate/` folder in the working directory or a folder above it (as git finds `.git`): a project
    that keeps its state beside it, as every home did before per-user ones."""
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        candidate = folder / PROJECT_FOLDER
        if candidate.is_dir():
            return candidate
    return None


def _user_folder(variable: str, fallback: str) -> Path:
    """An XDG base folder ($XDG_DATA_HOME, $XDG_CACHE_HOME; relative values are ignored, as the spec says)."""
    value = os.environ.get(variable, "")
    return Path(value) if os.path.isabs(value) else Path.home() / fallback


def project_home() -> Path:
    """Folder for local state (artifacts, MLflow, Prefect): SFTCURATE_HOME when set; else a project-local
    `.sftcurate/` when one exists here or above; else one per user, `$XDG_DATA_HOME/sftcurate`
    (~/.local/share/sftcurate), so runs from any folder share one store and one MLflow database."""
    explicit = os.environ.get("SFTCURATE_HOME")
    if explicit:
        return Path(explicit).expanduser().resolve()
    return project_local_home() or (_user_folder("XDG_DATA_HOME", ".local/share") / "sftcurate").resolve()


def model_cache_home() -> Path:
    """Converted and downloaded models (hundreds of MB each): inside SFTCURATE_HOME when it is set, or in a
    project-local home that already has them; else one per user, `$XDG_CACHE_HOME/sftcurate/models`
    (~/.cache/sftcurate/models), so a second folder or a second project reuses them."""
    if os.environ.get("SFTCURATE_HOME"):
        return project_home() / "models"
    local = project_local_home()
    if local is not None and (local / "models").is_dir():
        return local / "models"
    return (_user_folder("XDG_CACHE_HOME", ".cache") / "sftcurate" / "models").resolve()


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
