"""Runtime settings from the environment (embedded defaults when nothing is set).

| variable | default | meaning |
|---|---|---|
| SFTCURATE_HOME | ./.sftcurate (here or above) when it exists, else ~/.local/share/sftcurate ($XDG_DATA_HOME) | local state: artifacts, MLflow SQLite, Prefect results |
| SFTCURATE_STORE | $SFTCURATE_HOME/artifacts | artifact root: a local folder or s3://bucket/prefix |
| SFTCURATE_S3_ENDPOINT_URL / AWS_ENDPOINT_URL | unset | S3 API endpoint (MinIO, moto, ...) |
| AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_REGION | unset | S3 credentials (never logged) |
| SFTCURATE_STORAGE_RETRY_SECONDS | 120 | how long an unreachable S3 endpoint is retried (backoff) before the run stops |
| SFTCURATE_SERVICE_RETRY_SECONDS | 120 | how long an unreachable MLflow tracking server or Prefect API is retried (backoff) |
| MLFLOW_TRACKING_URI | sqlite:///$SFTCURATE_HOME/mlflow.db | tracking store or server |
| SFTCURATE_TASK_RUNNER | threads | threads, dask (local cluster or SFTCURATE_DASK_ADDRESS), ray (infra/runners.py) |
| SFTCURATE_THREADS | the cores in the affinity mask | CPU threads one run may use, shared with runs beside it (infra/runners.py) |
| SFTCURATE_DASK_ADDRESS | unset | scheduler address for an existing Dask cluster |
| SFTCURATE_DASK_WORKERS | 2 | worker processes of a local Dask cluster |
| SFTCURATE_RAY_ADDRESS | unset | address of an existing Ray cluster (needs prefect-ray) |
| SFTCURATE_MODEL_CACHE | $SFTCURATE_HOME/models when SFTCURATE_HOME is set (or a project-local home has one), else ~/.cache/sftcurate/models ($XDG_CACHE_HOME) | converted / downloaded models |
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from sftcurate.data_contracts.errors import UserError
from sftcurate.infra.env import model_cache_home, project_home

STORAGE_RETRY_SECONDS = 120.0
SERVICE_RETRY_SECONDS = 120.0  # an MLflow tracking server or a Prefect API (infra/reachability.py)
# Per request: botocore's defaults (60 s connect and read timeouts, several attempts each, inside s3fs's own five
# tries) made one store call against a dead endpoint take minutes; infra.store.retrying is the one retry loop
# over whole calls, so a single request is kept short.
CONNECT_TIMEOUT_SECONDS = 5.0
READ_TIMEOUT_SECONDS = 20.0
REQUEST_ATTEMPTS = 2  # botocore's own, for a throttled or 5xx answer


class SettingsError(UserError):
    pass


@dataclass(frozen=True)
class S3Settings:
    endpoint_url: str | None = None
    region: str | None = None
    key: str | None = field(default=None, repr=False)
    secret: str | None = field(default=None, repr=False)
    retry_seconds: float = STORAGE_RETRY_SECONDS

    def request_config(self, seconds_left: float | None = None) -> dict:
        """botocore Config keywords: short timeouts, few attempts, and all attempts of one request together no
        longer than `seconds_left` (what is left of the retry budget; the whole budget by default) or one second.
        botocore's second attempt (for a throttled or 5xx answer) only where two full attempts fit. Whole seconds,
        so the few distinct configs an outage makes reuse s3fs's cached filesystems."""
        left = self.retry_seconds if seconds_left is None else seconds_left
        attempts = REQUEST_ATTEMPTS if left >= REQUEST_ATTEMPTS * (READ_TIMEOUT_SECONDS + 1) else 1
        per_attempt = max(1.0, float(math.floor(left / attempts)))
        return {"connect_timeout": min(CONNECT_TIMEOUT_SECONDS, per_attempt),
                "read_timeout": min(READ_TIMEOUT_SECONDS, per_attempt),
                "retries": {"total_max_attempts": attempts, "mode": "standard"}}

    def storage_options(self, seconds_left: float | None = None) -> dict:
        opts: dict = {"config_kwargs": self.request_config(seconds_left)}
        if self.key:
            opts["key"] = self.key
        if self.secret:
            opts["secret"] = self.secret
        client_kwargs = {}
        if self.endpoint_url:
            client_kwargs["endpoint_url"] = self.endpoint_url
        if self.region:
            client_kwargs["region_name"] = self.region
        if client_kwargs:
            opts["client_kwargs"] = client_kwargs
        return opts


@dataclass(frozen=True)
class Settings:
    home: Path
    store_uri: str
    tracking_uri: str
    task_runner: str
    dask_address: str | None
    model_cache: Path
    s3: S3Settings
    service_retry_seconds: float = SERVICE_RETRY_SECONDS

    def __repr__(self) -> str:  # credentials stay out of logs even when the object is printed
        return (f"Settings(home={self.home}, store_uri={self.store_uri}, tracking_uri={self.tracking_uri}, "
                f"task_runner={self.task_runner})")


def load_settings() -> Settings:
    home = project_home()
    env = os.environ
    return Settings(
        home=home,
        store_uri=env.get("SFTCURATE_STORE", str(home / "artifacts")),
        tracking_uri=env.get("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}"),
        task_runner=env.get("SFTCURATE_TASK_RUNNER", "threads"),
        dask_address=env.get("SFTCURATE_DASK_ADDRESS"),
        model_cache=Path(env["SFTCURATE_MODEL_CACHE"]) if env.get("SFTCURATE_MODEL_CACHE") else model_cache_home(),
        s3=S3Settings(
            endpoint_url=env.get("SFTCURATE_S3_ENDPOINT_URL") or env.get("AWS_ENDPOINT_URL")
            or env.get("MLFLOW_S3_ENDPOINT_URL"),
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"),
            key=env.get("AWS_ACCESS_KEY_ID"),
            secret=env.get("AWS_SECRET_ACCESS_KEY"),
            retry_seconds=seconds_setting("SFTCURATE_STORAGE_RETRY_SECONDS", STORAGE_RETRY_SECONDS),
        ),
        service_retry_seconds=seconds_setting("SFTCURATE_SERVICE_RETRY_SECONDS", SERVICE_RETRY_SECONDS),
    )


def seconds_setting(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also refuses nan
        raise SettingsError(f"{name}={raw!r}: expected a number of seconds >= 0, e.g. {name}={default:g}")
    return value
