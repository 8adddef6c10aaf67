"""MLflow tracking: a SQLite file under SFTCURATE_HOME by default, a server when MLFLOW_TRACKING_URI says so.

Tasks log to the flow's run by id (`MlflowClient`), never through the thread-local active run, so tasks on
thread or Dask workers log to the right place.

A tracking server that cannot be reached (down, restarting, stalled) is waited for: before the first call its
`/health` is probed, and every client call is retried with backoff, for SFTCURATE_SERVICE_RETRY_SECONDS; then
`infra.reachability.ServiceUnavailable`, one line naming the URL and MLFLOW_TRACKING_URI (the CLI exits 1).
MLflow's own HTTP retries (7 with backoff factor 2 and a 120 s timeout: minutes per call) are cut to a few
quick ones, so the budget, not MLflow, decides how long a run waits.
"""
from __future__ import annotations

import functools
import json
import os
import socket
import tempfile
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

from filelock import FileLock

from sftcurate.infra import reachability
from sftcurate.infra.reachability import ServiceUnavailable
from sftcurate.infra.settings import load_settings

EXPERIMENT = "sftcurate"
PID_TAG, HOST_TAG, PIDNS_TAG = "sftcurate.pid", "sftcurate.host", "sftcurate.pidns"
_opened: set[str] = set()
_opening = threading.Lock()
SETTING = "MLFLOW_TRACKING_URI"
# MLflow 3's UI opens an experiment on its GenAI traces overview unless the experiment says it holds training runs
EXPERIMENT_KIND_TAG, TRAINING_RUNS = "mlflow.experimentKind", "custom_model_development"
WHAT = "MLflow tracking server"


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def _bound_mlflow_http_retries(budget: float) -> None:
    """MLflow's own retries for one request, kept short (a user's explicit setting wins): the retry loop over
    whole calls is `reachability.retrying`, bounded by the budget."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(max(5, min(30, budget)))))


def check_reachable(uri: str | None = None) -> None:
    """Wait for a tracking server's health endpoint within the budget (ServiceUnavailable otherwise); a SQLite or
    file store needs no wait. The CLI calls it before a flow starts, so an outage costs no flow run."""
    uri = uri or load_settings().tracking_uri
    if is_server(uri):
        reachability.wait_reachable(uri.rstrip("/") + "/health", what=WHAT, url=uri, setting=SETTING)


def configure() -> str:
    import mlflow  # deferred on purpose: MLflow (seconds to import), on the first tracked call only

    uri = load_settings().tracking_uri
    mlflow.set_tracking_uri(uri)
    if uri not in _opened:
        _open_store_once(uri)
    return uri


def _open_store_once(uri: str) -> None:
    """Open the tracking store once per process, a new SQLite file under a lock file: MLflow creates and migrates
    the tables on first open without locking, so two runs started together in a fresh SFTCURATE_HOME both ran
    the migrations and one died ("table ... already exists", "Online migration expected to match one row")."""
    from mlflow.tracking import MlflowClient  # deferred on purpose: MLflow (see configure)

    with _opening:
        if uri in _opened:
            return
        if is_server(uri):
            _bound_mlflow_http_retries(load_settings().service_retry_seconds)
            check_reachable(uri)
        with store_lock(uri):
            MlflowClient(uri)  # creates the tables when the file is new; the store is cached per URI from here on
        _opened.add(uri)


def store_lock(uri: str):
    """A cross-process lock beside a SQLite tracking database (a server needs none: it serialises itself)."""
    if not uri.startswith("sqlite:///"):
        return nullcontext()
    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(db) + ".lock")


def experiment_id(name: str = EXPERIMENT) -> str:
    uri = configure()
    c = client()
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.tags.get(EXPERIMENT_KIND_TAG) is None:  # one made before the tag: mark it once
            c.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_RUNS)
        return exp.experiment_id
    settings = load_settings()
    location = None
    if settings.tracking_uri.startswith("sqlite:") or settings.tracking_uri.startswith("file:"):
        # Otherwise MLflow drops artifacts into ./mlruns of whatever directory the process runs in.
        location = (settings.home / "mlruns").as_uri()
    with store_lock(uri):  # one process creates it, the others wait and find it
        exp = c.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        try:
            return c.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: TRAINING_RUNS})
        except ServiceUnavailable:
            raise
        except Exception:  # another machine created it first (a tracking server)
            return c.get_experiment_by_name(name).experiment_id


class _Patient:
    """An MlflowClient whose calls wait out an unreachable tracking server (`reachability.retrying`). A call may
    run twice when the server went away after doing it but before answering: a repeated `log_batch` is
    harmless, a repeated `create_run` leaves a RUNNING run with this process's id, which the next run ends."""

    def __init__(self, inner, uri: str):
        self._inner, self._uri = inner, uri

    def __getattr__(self, name: str):
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr

        @functools.wraps(attr)
        def call(*args, **kwargs):
            return reachability.retrying(lambda: attr(*args, **kwargs), what=WHAT, url=self._uri, setting=SETTING)

        return call


def client():
    from mlflow.tracking import MlflowClient  # deferred on purpose: MLflow (see configure)

    uri = configure()
    inner = MlflowClient(uri)
    return _Patient(inner, uri) if is_server(uri) else inner


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
    """A run that ends FINISHED on success, FAILED on an exception and KILLED on Ctrl-C (or another interrupt of
    the process). Yields the run id. A top-level run first ends as KILLED the runs a dead process on this machine
    left RUNNING (`kill -9`, an OOM kill), found by the process id and host they record."""
    c = client()
    exp_id = experiment_id(experiment)
    if not parent_run_id:
        end_orphans(exp_id)
    all_tags = {**dict(tags or {}), **process_tags()}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = c.create_run(exp_id, run_name=run_name, tags={k: str(v) for k, v in all_tags.items()})
    run_id = run.info.run_id
    if params:
        log_params(run_id, params)
    try:
        yield run_id
    except ServiceUnavailable:  # the server is gone: the run stays RUNNING until the next run ends it KILLED
        raise
    except Exception:
        c.set_terminated(run_id, status="FAILED")
        raise
    except BaseException:  # KeyboardInterrupt, SystemExit, Prefect's TerminationSignal: stopped, not broken
        c.set_terminated(run_id, status="KILLED")
        raise
    c.set_terminated(run_id, status="FINISHED")


def process_tags() -> dict[str, str]:
    """Who owns a run: this process on this machine. The pid namespace tells containers that share a host name
    (host networking) apart, whose pids mean different processes."""
    tags = {PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()}
    namespace = pid_namespace()
    if namespace:
        tags[PIDNS_TAG] = namespace
    return tags


def pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:  # not Linux
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def end_orphans(exp_id: str) -> list[str]:
    """End as KILLED the RUNNING runs of an experiment whose owning process on this machine is gone. Runs of other
    machines are left alone: their processes cannot be checked from here. Returns the ids it ended."""
    mine = process_tags()
    query = f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{mine[HOST_TAG]}'"
    ended = []
    for run in client().search_runs([exp_id], filter_string=query, max_results=1000):
        tags = run.data.tags
        if tags.get(PIDNS_TAG) != mine.get(PIDNS_TAG) or not tags.get(PID_TAG, "").isdigit():
            continue
        if not pid_alive(int(tags[PID_TAG])):
            client().set_terminated(run.info.run_id, status="KILLED")
            ended.append(run.info.run_id)
    return ended


def log_params(run_id: str, params: dict) -> None:
    from mlflow.entities import Param  # deferred on purpose: MLflow (see configure)

    flat = {k: v for k, v in flatten(params).items() if not _is_secret(k)}
    items = [Param(k, str(v)[:6000]) for k, v in flat.items()]
    for i in range(0, len(items), 100):
        client().log_batch(run_id, params=items[i:i + 100])


def log_metrics(run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
    from mlflow.entities import Metric  # deferred on purpose: MLflow (see configure)

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


def set_tags(run_id: str, tags: dict) -> None:
    from mlflow.entities import RunTag  # deferred on purpose: MLflow (see configure)

    items = [RunTag(k, str(v)) for k, v in tags.items() if v not in (None, "")]
    if items:
        client().log_batch(run_id, tags=items)


def run_url(run_id: str) -> str | None:
    """The run's page in the MLflow UI when tracking goes to a server; a SQLite file has no page of its own."""
    uri = load_settings().tracking_uri
    if not uri.startswith(("http://", "https://")):
        return None
    exp_id = client().get_run(run_id).info.experiment_id
    return f"{uri.rstrip('/')}/#/experiments/{exp_id}/runs/{run_id}"


def log_dataset(run_id: str, name: str, uri: str, digest: str, context: str, rows: int | None = None,
                tokens: int | None = None) -> None:
    """Fill the run's Datasets column: the artifact (not its bytes) by URI and content key, so the MLflow UI shows
    which pool and which selection a run used and two runs on the same data show the same digest."""
    from mlflow.entities import Dataset, DatasetInput, InputTag  # deferred on purpose: MLflow (see configure)

    profile = json.dumps({k: v for k, v in {"num_rows": rows, "loss_tokens": tokens}.items() if v is not None})
    dataset = Dataset(name=name, digest=digest[:36], source_type="sftcurate-artifact",
                      source=json.dumps({"uri": uri}), profile=profile)
    client().log_inputs(run_id, datasets=[DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])])
