"""The commands that run a flow (`run`, `refresh`, `compare`) or a long experiment (`reproduce synthetic`):
the services they need checked first, the stages and loops drawn while they run, and a Prefect server lost
meanwhile turned into one line. Imported when such a command runs: Prefect and the flows take seconds."""
from __future__ import annotations

import contextlib
import logging
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Optional

import prefect.logging  # noqa: F401  (makes sure Prefect's handlers exist before they are filtered)
from prefect.settings import PREFECT_API_URL

from sftcurate import cli_io
from sftcurate.cli_common import QuietOneLineErrors, caught, emit, one_line_errors, print_error, show_markdown, stop
from sftcurate.cli_io import console, out, stdout_for_json
from sftcurate.core.config import load_compare_config, load_config
from sftcurate.core.synthetic import run_synthetic
from sftcurate.data_contracts.errors import chain
from sftcurate.flows import curate, refresh
from sftcurate.flows.compare import compare as compare_flow
from sftcurate.infra import progress, tracking
from sftcurate.infra.reachability import Watch, unreachable, wait_for_prefect_api
from sftcurate.infra.runners import balance_threads, register_process
from sftcurate.terminal import StageDisplay, quiet_prefect_console

FLOWS = {"curate": curate.curate, "refresh": refresh.refresh}


def quiet_one_line_errors_in_logs() -> None:
    quiet = QuietOneLineErrors()
    for name in ("", "prefect", "prefect.flow_runs", "prefect.task_runs", "prefect.flow_engine", "prefect.task_engine"):
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(quiet)


def wait_for_services() -> None:
    """Before a flow starts: the Prefect API (when PREFECT_API_URL names a server) and the MLflow tracking server
    (when MLFLOW_TRACKING_URI names one) must answer within SFTCURATE_SERVICE_RETRY_SECONDS, or the command stops
    with one line naming the URL and the setting (exit 1) instead of Prefect's or MLflow's tracebacks."""
    wait_for_prefect_api(PREFECT_API_URL.value())
    tracking.check_reachable()


def run_with_progress(fn, *args, **kwargs):
    """Run a flow while showing its stages, and the loops inside them, in the terminal. A Prefect server lost
    during the run stops it with one line (exit 1) once SFTCURATE_SERVICE_RETRY_SECONDS are spent."""
    quiet_one_line_errors_in_logs()
    if not cli_io.VERBOSE:
        quiet_prefect_console()
    register_process()  # runs side by side share the cores (infra/runners.py), re-balanced at every stage
    balance_threads()

    def rebalance(_name: str, event: str, _detail: dict) -> None:
        if event == "start":
            balance_threads()

    with StageDisplay(console) as display, watching_prefect_api(display) as watch:
        unsubscribe = progress.subscribe(display.on_event)
        unsubscribe_balance = progress.subscribe(rebalance)
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if watch is not None and not isinstance(exc, one_line_errors()) and prefect_api_error(exc, watch.url):
                raise watch.lost_during_run(exc) from exc
            raise
        finally:
            unsubscribe_balance()
            unsubscribe()


def prefect_api_error(exc: BaseException, api_url: str) -> bool:
    """Whether a flow failed because a request to the Prefect API got no answer (not the store, not MLflow,
    not a judge's endpoint: those say so themselves)."""

    def requested(e: BaseException) -> str:
        try:
            return str(e.request.url)  # httpx errors carry their request (a property that may raise)
        except Exception:
            return ""

    return any(requested(e).startswith(api_url.rstrip("/")) and unreachable(e) for e in chain(exc))


@contextlib.contextmanager
def watching_prefect_api(display):
    """While a flow runs against a Prefect server, watch it. Prefect's client retries each request for about a
    minute and the engine then makes more requests to report the failure, each retried again (about five
    minutes in all, measured); so when the server stays down through the budget, the watch ends the process:
    one line, exit 1. Committed artifacts are whole (manifests are written last and whole), and the MLflow run
    this process leaves RUNNING is ended KILLED by the next run, as after any kill."""
    url = PREFECT_API_URL.value()
    if not url:
        yield None
        return

    def lost(error) -> None:
        with contextlib.suppress(Exception):
            display.progress.stop()
        status = print_error(error)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)

    with Watch(url.rstrip("/") + "/health", what="Prefect API", url=url, setting="PREFECT_API_URL",
               on_lost=lost) as watch:
        yield watch


def export_command(selection_uri: str, name: str) -> str:
    """The exact command that writes a selection's records out, with a file name made from the run's name."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "selection"
    return f"sftcurate export {shlex.quote(selection_uri)} --out {shlex.quote(stem + '.jsonl')}"


def run_curate(config: Path, overrides: list[str], json_out: Optional[str]) -> None:
    cfg, summary = run_config_flow("curate", config, overrides, json_out)
    summary["next"] = export_command(summary["selection_uri"], cfg.name)
    emit(f"curation {cfg.name}", summary, json_out)


def run_refresh(config: Path, overrides: list[str], json_out: Optional[str]) -> None:
    cfg, report = run_config_flow("refresh", config, overrides, json_out)
    shown = {k: (v if not isinstance(v, list) else f"{len(v)} ids: {', '.join(v[:5])}{' ...' if len(v) > 5 else ''}")
             for k, v in report.items()}
    emit(f"refresh {cfg.name}", report, json_out, shown)


def run_config_flow(name: str, config: Path, overrides: list[str], json_out: Optional[str]):
    """Load a CurateConfig, run flows.<name>.<name> on it with progress; one-line errors; optional JSON."""
    try:
        cfg = load_config(config, overrides)
        wait_for_services()
        with stdout_for_json(json_out):
            result = run_with_progress(FLOWS[name], cfg)
    except caught() as exc:
        stop(exc)
    return cfg, result


def run_compare(config: Path, overrides: list[str], json_out: Optional[str]) -> None:
    try:
        cfg = load_compare_config(config, overrides)
        wait_for_services()
        with stdout_for_json(json_out):
            summary = run_with_progress(compare_flow, cfg)
    except caught() as exc:
        stop(exc)
    emit("comparison", summary, json_out,
         {k: v for k, v in summary.items() if not isinstance(v, (list, dict)) and k != "table_markdown"})
    show_markdown(console if json_out == "-" else out, summary["table_markdown"])


def reproduce_synthetic(out_dir: Path, runs: int, seed: int, json_out: Optional[str]) -> None:
    with stdout_for_json(json_out):
        result = run_with_progress(run_synthetic, str(out_dir), runs=runs, seed=seed)
    emit("FisherSFT synthetic reproduction", result, json_out,
         {k: v for k, v in result.items() if not isinstance(v, list)})
