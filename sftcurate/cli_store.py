"""The commands that look at what is already there: `ls` (recent curations, from MLflow), `verify` (committed
artifacts against their manifests) and `ui` (the Prefect and MLflow UIs on the local runs). Imported when one
runs; none of them loads torch or Prefect."""
from __future__ import annotations

import signal
import time
from typing import Optional

import typer

from sftcurate.cli_common import caught, emit, stop
from sftcurate.cli_io import console, out, stdout_for_json, write_json
from sftcurate.core.locate import recent_curations
from sftcurate.infra import ui as uis
from sftcurate.infra.store import verify_store
from sftcurate.terminal import curations_table


def list_curations(limit: int, name: Optional[str], json_out: Optional[str]) -> None:
    try:
        with stdout_for_json(json_out):
            rows = recent_curations(limit, name)
    except caught() as exc:
        stop(exc)
    if json_out:
        write_json(json_out, rows)
    target = console if json_out == "-" else out
    if not rows:
        target.print("no curations yet: `sftcurate run CONFIG.yaml` makes one", markup=False, highlight=False)
        return
    target.print(curations_table(rows), soft_wrap=True)


def verify(uri: Optional[str], json_out: Optional[str]) -> None:
    try:
        with stdout_for_json(json_out):
            result = verify_store(uri)
    except caught() as exc:
        stop(exc)
    for artifact, damage in result["damaged"].items():
        console.print(f"damaged: {artifact}: {damage}", markup=False, highlight=False, soft_wrap=True)
    emit("verify", result, json_out, shown={"checked": result["checked"], "damaged": len(result["damaged"])})
    if result["damaged"]:
        raise typer.Exit(1)


def ui(prefect_port: int, mlflow_port: int, json_out: Optional[str]) -> None:
    try:
        planned = uis.plan(prefect_port, mlflow_port)
        with stdout_for_json(json_out):
            procs = uis.start(planned)
    except caught() as exc:
        stop(exc)
    emit("UIs (Ctrl-C stops the servers started here)", {u.name: u.url for u in planned}, json_out)
    if not procs:  # both are servers the runs already use
        return
    # Ctrl-C, also where a shell started us in the background (which ignores SIGINT), and a plain kill stop the
    # servers: they run in their own sessions and would outlive this process otherwise
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        while all(p.poll() is None for p in procs):
            time.sleep(1)
        console.print("a UI server stopped; see its log under the home's ui/ folder", markup=False)
    except KeyboardInterrupt:
        pass
    finally:
        uis.stop(procs)
