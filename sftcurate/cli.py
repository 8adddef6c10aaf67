"""The `sftcurate` command line (typer)."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import List, Literal, Optional, get_args

import sftcurate.infra  # noqa: F401  (environment defaults before Prefect/MLflow are imported)
import typer
import yaml
from rich.console import Console

from sftcurate.selectcli import select_app

app = typer.Typer(no_args_is_help=True,
                  help="Pick the most informative subset of an SFT data set, fine-tune on it, prove the gain.")
reproduce_app = typer.Typer(no_args_is_help=True, help="Reproduce experiments from the papers.")
app.add_typer(reproduce_app, name="reproduce")
config_app = typer.Typer(no_args_is_help=True, help="Show or start a configuration (every field, with defaults).")
app.add_typer(config_app, name="config")
console = Console(stderr=True)
out = Console()
# core.export.ExportFormat, spelled out here so `--help` and a bad --format need no heavy import (a test checks
# that the two agree)
ExportFormatChoice = Literal["jsonl", "parquet", "messages", "hf"]
VERBOSE = False  # set by `-v`


def one_line_errors() -> tuple[type[BaseException], ...]:
    """Errors the CLI prints as one line, no traceback: a user's mistake (exit 2) and a dependency that stayed
    unreachable through its retry budget, such as the artifact store's endpoint (exit 1)."""
    from sftcurate.data_contracts.errors import DependencyError, UserError

    return (UserError, DependencyError)


class _QuietOneLineErrors(logging.Filter):
    """Prefect logs a failed run's traceback and its final state ("Finished in state Failed('... IngestError:
    ...')"); for these errors the CLI's one line says it better, once."""

    def filter(self, record: logging.LogRecord) -> bool:
        from sftcurate.data_contracts.errors import disk_full

        exc = record.exc_info[1] if record.exc_info else None
        if exc is None:
            return not _mentions_one_line_error(record.getMessage())
        return not (isinstance(exc, one_line_errors()) or disk_full(exc))


def _mentions_one_line_error(message: str) -> bool:
    if DISK_FULL_TEXT in message:
        return True
    if any(base.__name__ in message for base in one_line_errors()):
        return True
    names = {cls.__name__ for base in one_line_errors() for cls in _subclasses(base)}
    return any(f"{name}:" in message or f"{name}(" in message for name in names)


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def quiet_one_line_errors_in_logs() -> None:
    import prefect.logging  # noqa: F401  (makes sure Prefect's handlers exist)

    quiet = _QuietOneLineErrors()
    for name in ("", "prefect", "prefect.flow_runs", "prefect.task_runs", "prefect.flow_engine", "prefect.task_engine"):
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(quiet)


DISK_FULL_TEXT = "No space left on device"


def _written_path(exc: BaseException) -> str | None:
    """The file a failed write was writing, as the error says it (`infra.store` names the file it writes on an
    error that names none: a write() on an open file)."""
    from sftcurate.data_contracts.errors import chain

    return next((str(e.filename) for e in chain(exc) if isinstance(e, OSError) and e.filename), None)


def stop(exc: BaseException) -> None:
    """The CLI's handler for what it catches: one line for a user error, a dependency that stayed down, or a full
    disk (exit 1: free space and run again; the artifact being written was not committed); any other OSError is a
    bug and keeps its traceback."""
    from sftcurate.data_contracts.errors import DependencyError, disk_full

    if isinstance(exc, one_line_errors()):
        fail(exc)
    if disk_full(exc):
        where = _written_path(exc) or "a write"
        fail(DependencyError(f"{where}: {DISK_FULL_TEXT.lower()} (the disk is full); free space there, or point "
                             "SFTCURATE_STORE (artifacts) or SFTCURATE_HOME (local state) at a larger disk, and run "
                             "again; nothing partly written was committed"))
    raise exc


def caught() -> tuple[type[BaseException], ...]:
    return (*one_line_errors(), OSError)


def fail(exc: BaseException) -> None:
    raise typer.Exit(print_error(exc))


def print_error(exc: BaseException) -> int:
    """Print `exc` as one `error:` line; returns the exit status it calls for (1: a dependency, 2: the input)."""
    from rich.markup import escape

    from sftcurate.data_contracts.errors import DependencyError

    message = " ".join(str(exc).split()) or type(exc).__name__  # one line, whatever the message holds
    # escaped: messages quote the user's text ("expected a 2-d [examples, checkpoints] array", "[bold]" in a
    # file name), which rich would otherwise read as markup and drop
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return 1 if isinstance(exc, DependencyError) else 2


def wait_for_services() -> None:
    """Before a flow starts: the Prefect API (when PREFECT_API_URL names a server) and the MLflow tracking server
    (when MLFLOW_TRACKING_URI names one) must answer within SFTCURATE_SERVICE_RETRY_SECONDS, or the command stops
    with one line naming the URL and the setting (exit 1) instead of Prefect's or MLflow's tracebacks."""
    from prefect.settings import PREFECT_API_URL

    from sftcurate.infra import tracking
    from sftcurate.infra.reachability import wait_for_prefect_api

    wait_for_prefect_api(PREFECT_API_URL.value())
    tracking.check_reachable()


def run_with_progress(fn, *args, **kwargs):
    """Run a flow while showing its stages, and the loops inside them, in the terminal. A Prefect server lost
    during the run stops it with one line (exit 1) once SFTCURATE_SERVICE_RETRY_SECONDS are spent."""
    from sftcurate.infra import progress
    from sftcurate.infra.runners import balance_threads, register_process
    from sftcurate.terminal import StageDisplay, quiet_prefect_console

    quiet_one_line_errors_in_logs()
    if not VERBOSE:
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
            if watch is not None and not isinstance(exc, one_line_errors()) and _prefect_api_error(exc, watch.url):
                raise watch.lost_during_run(exc) from exc
            raise
        finally:
            unsubscribe_balance()
            unsubscribe()


def _prefect_api_error(exc: BaseException, api_url: str) -> bool:
    """Whether a flow failed because a request to the Prefect API got no answer (not the store, not MLflow,
    not a judge's endpoint: those say so themselves)."""
    from sftcurate.data_contracts.errors import chain
    from sftcurate.infra.reachability import unreachable

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
    from prefect.settings import PREFECT_API_URL

    from sftcurate.infra.reachability import Watch

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


JSON_HELP = "also write the result as JSON to this file (- for stdout: then stdout holds the JSON alone)"


def json_option():
    return typer.Option(None, "--json", help=JSON_HELP)


@contextlib.contextmanager
def stdout_for_json(json_out: Optional[str]):
    """With `--json -` standard output carries the JSON and nothing else: whatever the command or a library
    prints while it works goes to stderr."""
    if json_out != "-":
        yield
        return
    with contextlib.redirect_stdout(sys.stderr):
        yield


def emit(title: str, result, json_out: Optional[str], shown: Optional[dict] = None) -> None:
    """The command's result: as JSON where `--json` says, and as `key  value` lines for people (on stderr when
    stdout carries the JSON). `shown` is what the lines show when it differs from the JSON."""
    from sftcurate.terminal import summary_text

    if json_out:
        _write_json(json_out, result)
    (console if json_out == "-" else out).print(summary_text(title, result if shown is None else shown),
                                                soft_wrap=True, highlight=False)


def export_command(selection_uri: str, name: str) -> str:
    """The exact command that writes a selection's records out, with a file name made from the run's name."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "selection"
    return f"sftcurate export {shlex.quote(selection_uri)} --out {shlex.quote(stem + '.jsonl')}"


@app.command()
def run(config: Path = typer.Argument(..., help="run configuration (YAML)"),
        set_: List[str] = typer.Option([], "--set", help="override a setting: section.key=value"),
        json_out: Optional[str] = json_option()):
    """Run the `curate` flow: ingest -> select -> commit a selection manifest."""
    cfg, summary = run_config_flow("curate", config, set_, json_out)
    summary["next"] = export_command(summary["selection_uri"], cfg.name)
    emit(f"curation {cfg.name}", summary, json_out)


def run_config_flow(name: str, config: Path, overrides: list[str], json_out: Optional[str]):
    """Load a CurateConfig, run flows.<name>.<name> on it with progress; one-line errors; optional JSON."""
    from sftcurate.core.config import load_config
    from sftcurate.flows import curate, refresh  # deferred on purpose: Prefect takes seconds to import
    from sftcurate.infra.env import ensure_home

    ensure_home()  # before Prefect is imported: it makes its home (inside ours) without parents, or fails
    try:
        cfg = load_config(config, overrides)
        wait_for_services()
        with stdout_for_json(json_out):
            result = run_with_progress({"curate": curate.curate, "refresh": refresh.refresh}[name], cfg)
    except caught() as exc:
        stop(exc)
    return cfg, result


@app.command()
def refresh(config: Path = typer.Argument(..., help="run configuration (YAML)"),
            set_: List[str] = typer.Option([], "--set", help="override a setting: section.key=value"),
            json_out: Optional[str] = json_option()):
    """Run the `refresh` flow: re-curate if the source data changed (all cache hits if not), report the change."""
    cfg, report = run_config_flow("refresh", config, set_, json_out)
    shown = {k: (v if not isinstance(v, list) else f"{len(v)} ids: {', '.join(v[:5])}{' ...' if len(v) > 5 else ''}")
             for k, v in report.items()}
    emit(f"refresh {cfg.name}", report, json_out, shown)


def run_select(method: str, job, json_out: Optional[str]) -> None:
    """`sftcurate select METHOD`: its subcommands come from the selector registry (sftcurate/selectcli.py)."""
    try:
        with stdout_for_json(json_out):
            meta = job()
    except caught() as exc:
        stop(exc)
    emit(f"selection {method}", meta, json_out)


app.add_typer(select_app(run_select, JSON_HELP), name="select")


@app.command()
def compare(config: Path = typer.Argument(..., help="comparison configuration (YAML)"),
            set_: List[str] = typer.Option([], "--set", help="override a setting: section.key=value"),
            json_out: Optional[str] = json_option()):
    """Run the `compare` flow: selectors x budgets, fine-tune, held-out loss, pairwise judge."""
    from sftcurate.infra.env import ensure_home

    ensure_home()  # before Prefect is imported: it makes its home (inside ours) without parents, or fails
    try:
        from sftcurate.core.config import load_compare_config
        from sftcurate.flows.compare import compare as compare_flow

        cfg = load_compare_config(config, set_)
        wait_for_services()
        with stdout_for_json(json_out):
            summary = run_with_progress(compare_flow, cfg)
    except caught() as exc:
        stop(exc)
    emit("comparison", summary, json_out,
         {k: v for k, v in summary.items() if not isinstance(v, (list, dict)) and k != "table_markdown"})
    show_markdown(console if json_out == "-" else out, summary["table_markdown"])


def show_markdown(target: Console, text: str) -> None:
    """Markdown rendered on a terminal (its tables as tables that fit, not raw lines wrapping mid-row); as it
    is when written to a file or a pipe, for whoever reads it there."""
    if target.is_terminal:
        from rich.markdown import Markdown

        target.print(Markdown(text))
    else:
        target.print(text, markup=False, highlight=False, soft_wrap=True)


@app.command()
def export(selection: str = typer.Argument(..., help="what to export: a selection URI or a curated URI (both "
                                                    "printed by `run`), a Prefect flow-run id, an MLflow run id, or "
                                                    "a config's name (its latest curation)"),
           out_path: str = typer.Option(..., "--out", help="where to write: a local path or s3://"),
           # the choices in the help, checked by core.export: a bad value is one error line, not click's usage panel
           fmt: str = typer.Option("jsonl", "--format", metavar="[" + "|".join(get_args(ExportFormatChoice)) + "]",
                                   help="jsonl or parquet: your records as they were; messages: OpenAI chat "
                                        "messages (jsonl); hf: a Hugging Face datasets folder"),
           push_to_hub: Optional[str] = typer.Option(None, help="also push to this Hugging Face dataset repo"),
           overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing --out (never a source)"),
           json_out: Optional[str] = json_option()):
    """Write the selected records out, in pick order, in the format your trainer reads."""
    from sftcurate.core.export import export as export_records
    from sftcurate.core.locate import locate_selection

    try:
        with stdout_for_json(json_out):
            found = locate_selection(selection)
            result = {**export_records(found.selection_uri, out_path, fmt, push_to_hub, overwrite),
                      "selection_uri": found.selection_uri, "found_by": found.how}
    except caught() as exc:
        stop(exc)
    emit("export", result, json_out)


@app.command()
def ui(prefect_port: int = typer.Option(4200, help="port of the Prefect UI server started here"),
       mlflow_port: int = typer.Option(5000, help="port of the MLflow UI server started here"),
       json_out: Optional[str] = json_option()):
    """Open the Prefect UI on the local runs' database and the MLflow UI on their tracking store (servers already
    set in PREFECT_API_URL / MLFLOW_TRACKING_URI are used as they are); prints both addresses; Ctrl-C stops them."""
    from sftcurate.infra import ui as uis

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


@app.command("ls")
def list_curations(limit: int = typer.Option(20, "--limit", "-n", min=1, help="how many, newest first"),
                   name: Optional[str] = typer.Option(None, help="only the curations of this config name"),
                   json_out: Optional[str] = json_option()):
    """List recent curations (newest first): name, method, budgets, what was kept, and the URIs to export."""
    from sftcurate.core.locate import recent_curations
    from sftcurate.terminal import curations_table

    try:
        with stdout_for_json(json_out):
            rows = recent_curations(limit, name)
    except caught() as exc:
        stop(exc)
    if json_out:
        _write_json(json_out, rows)
    target = console if json_out == "-" else out
    if not rows:
        target.print("no curations yet: `sftcurate run CONFIG.yaml` makes one", markup=False, highlight=False)
        return
    target.print(curations_table(rows), soft_wrap=True)


@app.command()
def verify(uri: Optional[str] = typer.Argument(None, help="a store root or one artifact folder (default: "
                                                         "SFTCURATE_STORE)"),
           json_out: Optional[str] = json_option()):
    """Check every committed artifact's files against the sizes and sha256s its manifest records; exit 1 if any
    is damaged (the next run that needs it rebuilds it)."""
    from sftcurate.infra.store import verify_store

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


def _write_json(target: str, obj) -> None:
    text = json.dumps(obj, indent=2, default=str)
    if target == "-":
        sys.stdout.write(text + "\n")  # not through rich: a "[b]" inside a value is data, not markup
        sys.stdout.flush()
    else:
        Path(target).write_text(text)


@reproduce_app.command("synthetic")
def reproduce_synthetic(out_dir: Path = typer.Option(..., "--out", help="folder for the table and plot"),
                        runs: int = typer.Option(20, help="independent runs to average"),
                        seed: int = typer.Option(0),
                        json_out: Optional[str] = json_option()):
    """Section 5.1 of the FisherSFT paper: Uniform vs DensitySampling vs FisherSFT on synthetic data."""
    from sftcurate.core.synthetic import run_synthetic

    with stdout_for_json(json_out):
        result = run_with_progress(run_synthetic, str(out_dir), runs=runs, seed=seed)
    emit("FisherSFT synthetic reproduction", result, json_out,
         {k: v for k, v in result.items() if not isinstance(v, list)})


@config_app.command("show")
def config_show(config: Optional[Path] = typer.Argument(None, help="configuration (YAML); none: the defaults"),
                set_: List[str] = typer.Option([], "--set", help="override a setting: section.key=value"),
                compare_config: bool = typer.Option(False, "--compare", help="a comparison configuration"),
                json_out: Optional[str] = json_option()):
    """Print the effective configuration: the file, the --set overrides and every default."""
    from sftcurate.core.config import dump_config, load_compare_config, load_config

    try:
        cfg = load_compare_config(config, set_) if compare_config else load_config(config, set_)
    except caught() as exc:
        stop(exc)
    if json_out:
        _write_json(json_out, cfg.model_dump(mode="json"))
    if json_out != "-":
        out.print(dump_config(cfg), markup=False, highlight=False, soft_wrap=True)


@config_app.command("init")
def config_init(out_path: Path = typer.Option(..., "--out", help="file to write (YAML)"),
                compare_config: bool = typer.Option(False, "--compare", help="a comparison configuration"),
                json_out: Optional[str] = json_option()):
    """Write a configuration with every field at its default, to edit."""
    from sftcurate.core.config import CompareConfig, CurateConfig, dump_config

    if out_path.exists():
        fail(FileExistsError(f"{out_path}: exists; choose another --out or remove it"))
    out_path.write_text(dump_config(CompareConfig() if compare_config else CurateConfig(), described=True))
    if json_out:
        _write_json(json_out, {"wrote": str(out_path), "kind": "compare" if compare_config else "curate"})
    console.print(f"wrote {out_path}", markup=False, highlight=False)


def version_callback(value: bool) -> None:
    if value:
        from sftcurate import __version__

        out.print(f"sftcurate {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(version: bool = typer.Option(False, "--version", callback=version_callback, is_eager=True,
                                              help="print the version and exit"),
                 verbose: bool = typer.Option(False, "--verbose", "-v",
                                              help="show library warnings, progress bars and Prefect's log lines")):
    """Pick the most informative subset of an SFT data set, fine-tune on it, prove the gain."""
    global VERBOSE
    VERBOSE = verbose
    if not verbose:
        from sftcurate.terminal import quiet_libraries

        quiet_libraries()


def main() -> None:  # pragma: no cover
    sys.exit(app())
