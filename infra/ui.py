"""`sftcurate ui`: the Prefect UI on the database the local runs used and the MLflow UI on the local tracking
store, with the settings that otherwise take know-how (a Prefect server on the ephemeral database needs
`PREFECT_HOME` and `PREFECT_UI_API_URL`; MLflow needs the backend URI), until Ctrl-C.

Where runs already go to servers (`PREFECT_API_URL`, an `http(s)://` `MLFLOW_TRACKING_URI`), nothing is started
for that side: its address is printed. The MLflow address opens the sftcurate experiment's runs
(`infra.tracking` marks the experiment as one of training runs, so MLflow does not open its GenAI overview).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from sftcurate.data_contracts.errors import DependencyError, UserError
from sftcurate.infra import tracking
from sftcurate.infra.env import ensure_home
from sftcurate.infra.services import installed
from sftcurate.infra.settings import load_settings

HOST = "127.0.0.1"


class UIError(UserError):
    """A port is taken, or a UI server would not start."""


@dataclass
class UI:
    name: str
    url: str                           # what to open in a browser
    port: int | None = None            # a server this command starts: its port and the address it answers on
    health: str | None = None
    command: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    log: Path | None = None


def _executable(name: str) -> str:
    found = installed(name)
    if not found:
        raise UIError(f"{name}: not found next to {sys.executable} or on PATH; run `make install`")
    return found


def prefect_ui(port: int, home: Path) -> UI:
    """The Prefect UI: the server runs point at, or a server on the local runs' database (PREFECT_HOME's)."""
    api = os.environ.get("PREFECT_API_URL", "").rstrip("/")
    if api:
        return UI("prefect", api.removesuffix("/api"))
    base = f"http://{HOST}:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_URL")}
    env.update({"PREFECT_HOME": os.environ.get("PREFECT_HOME", str(home / "prefect")),
                "PREFECT_UI_API_URL": f"{base}/api", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    return UI("prefect", f"{base}/runs", port, f"{base}/api/health",
              [_executable("prefect"), "server", "start", "--host", HOST, "--port", str(port), "--analytics-off"],
              env, home / "ui" / "prefect.log")


def mlflow_ui(port: int, home: Path) -> UI:
    """The MLflow UI on the sftcurate experiment's runs: the tracking server's, or one on the local store."""
    uri = load_settings().tracking_uri
    experiment = tracking.experiment_id()  # marks the experiment as one of training runs
    if tracking.is_server(uri):
        return UI("mlflow", f"{uri.rstrip('/')}/#/experiments/{experiment}/runs")
    base = f"http://{HOST}:{port}"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no GenAI job runner processes
    return UI("mlflow", f"{base}/#/experiments/{experiment}/runs", port, f"{base}/health",
              [_executable("mlflow"), "server", "--backend-store-uri", uri, "--host", HOST, "--port", str(port),
               "--workers", "1"], env, home / "ui" / "mlflow.log")


def plan(prefect_port: int, mlflow_port: int) -> list[UI]:
    home = ensure_home()
    uis = [prefect_ui(prefect_port, home), mlflow_ui(mlflow_port, home)]
    for ui in uis:
        if ui.port is not None and not _port_free(ui.port):
            raise UIError(f"port {ui.port} is taken; choose another with --{ui.name}-port")
    return uis


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
            return True
        except OSError:
            return False


def start(uis: list[UI], timeout: float = 180.0) -> list[subprocess.Popen]:
    """Start the servers the plan needs and wait until each answers; stops them all if one does not."""
    procs = []
    try:
        for ui in uis:
            if ui.port is None:
                continue
            ui.log.parent.mkdir(parents=True, exist_ok=True)
            with open(ui.log, "ab") as log:
                procs.append(subprocess.Popen(ui.command, env=ui.env, stdin=subprocess.DEVNULL, stdout=log,
                                              stderr=subprocess.STDOUT, start_new_session=True))
            _wait(ui, procs[-1], timeout)
    except BaseException:
        stop(procs)
        raise
    return procs


def _wait(ui: UI, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(ui.health, timeout=2) as answer:
                if answer.status < 500:
                    return
        except OSError:
            pass
        if proc.poll() is not None:
            raise DependencyError(f"the {ui.name} UI server exited with code {proc.returncode} while starting; "
                                  f"see {ui.log}")
        time.sleep(0.5)
    raise DependencyError(f"the {ui.name} UI server did not answer {ui.health} within {timeout:.0f} s; see {ui.log}")


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
