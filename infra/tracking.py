"""MLflow tracking: a SQLite file under SFTCURATE_HOME by default, a server when MLFLOW_TRACKING_URI says so.

Tasks log to the flow's run by id (`MlflowClient`), never through the thread-local active run, so tasks on
thread or Dask workers log to the right place.
"""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from sftcurate.infra.settings import load_settings

EXPERIMENT = "sftcurate"


def configure() -> str:
    import mlflow

    uri = load_settings().tracking_uri
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    return uri


def experiment_id(name: str = EXPERIMENT) -> str:
    import mlflow

    configure()
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    settings = load_settings()
    location = None
    if settings.tracking_uri.startswith("sqlite:") or settings.tracking_uri.startswith("file:"):
        # Otherwise MLflow drops artifacts into ./mlruns of whatever directory the process runs in.
        location = (settings.home / "mlruns").as_uri()
    try:
        return mlflow.create_experiment(name, artifact_location=location)
    except Exception:  # another process created it first
        return mlflow.get_experiment_by_name(name).experiment_id


def client():
    from mlflow.tracking import MlflowClient

    configure()
    return MlflowClient()


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) or v is None else json.dumps(v, default=str)
    return out


def _is_secret(key: str) -> bool:
    low = key.lower()
    return any(s in low for s in ("api_key", "secret", "password", "token_value", "credentials"))


@contextmanager
def start_run(run_name: str, tags: dict | None = None, params: dict | None = None,
              parent_run_id: str | None = None, experiment: str = EXPERIMENT):
    """A run that ends FINISHED on success and FAILED on an exception. Yields the run id."""
    c = client()
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = c.create_run(experiment_id(experiment), run_name=run_name, tags={k: str(v) for k, v in all_tags.items()})
    run_id = run.info.run_id
    if params:
        log_params(run_id, params)
    try:
        yield run_id
    except BaseException:
        c.set_terminated(run_id, status="FAILED")
        raise
    c.set_terminated(run_id, status="FINISHED")


def log_params(run_id: str, params: dict) -> None:
    from mlflow.entities import Param

    flat = {k: v for k, v in flatten(params).items() if not _is_secret(k)}
    items = [Param(k, str(v)[:6000]) for k, v in flat.items()]
    for i in range(0, len(items), 100):
        client().log_batch(run_id, params=items[i:i + 100])


def log_metrics(run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None]
    if items:
        client().log_batch(run_id, metrics=items)


def log_bytes(run_id: str, data: bytes, name: str, artifact_path: str | None = None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, name)
        with open(path, "wb") as f:
            f.write(data)
        client().log_artifact(run_id, path, artifact_path)


def log_file(run_id: str, path: str, artifact_path: str | None = None) -> None:
    client().log_artifact(run_id, path, artifact_path)
