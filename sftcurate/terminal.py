"""What a run shows on the terminal: one line per finished stage, live bars with counts, rate and ETA inside the
long ones, and nothing else unless `-v` asks for it.

Quiet means library chatter (warnings, tqdm bars, transformers' notices, MLflow's database set-up, Prefect's
per-task lines) stays off the terminal; Prefect's lines still reach its API, so the UI's run log keeps them.
"""
from __future__ import annotations

import logging
import os
import time
import warnings

from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, SpinnerColumn, Task, TaskID,
                           TextColumn, TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text

CHATTY_LOGGERS = ("mlflow", "alembic", "transformers", "datasets", "httpx", "httpcore", "urllib3", "botocore",
                  "s3fs", "aiobotocore", "peft", "accelerate", "torch", "distributed", "numexpr")
_QUIET_ENV = {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error",
              "MLFLOW_LOGGING_LEVEL": "ERROR",  # MLflow resets its loggers when imported; it reads this
              "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "PYTHONWARNINGS": "ignore"}


def quiet_libraries() -> None:
    """Before any library is imported: environment switches they read at import time, then warnings and
    loggers. A user's explicit environment setting wins."""
    for key, value in _QUIET_ENV.items():
        os.environ.setdefault(key, value)
    warnings.filterwarnings("ignore")
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def quiet_prefect_console() -> None:
    """Prefect's console handlers show errors only; its API handler (the UI's run log) keeps every line. A log
    handler that fails (Prefect's API log worker while its server is down) stays silent instead of writing
    "--- Error logging to API ---" to stderr for every batch: the run's one error line says what went wrong."""
    # deferred on purpose: Prefect (seconds), for commands that run a flow only
    import prefect.logging  # noqa: F401  (makes sure Prefect's handlers exist)
    from prefect.logging.handlers import PrefectConsoleHandler

    logging.raiseExceptions = False  # the logging module's own switch for production; `-v` leaves it on
    # Prefect's background services (events, logs) log each item they could not send, in full (a kilobyte a
    # line), while its server is down: the run's watch on the server says that once, in one line
    for handler in logging.getLogger("prefect._internal").handlers:
        handler.setLevel(logging.CRITICAL)

    for name in ("", "prefect", "uvicorn", "fastapi", "prefect.flow_runs", "prefect.task_runs"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, PrefectConsoleHandler):
                handler.setLevel(logging.ERROR)


class OnceCounted(ProgressColumn):
    """A column shown once the stage's loop has reported how many steps it has: before that, a count of `0/?` and
    an ETA of `-:--:--` read as a stuck stage (ingest showed `0/?` for 25 s); the spinner and the elapsed time
    say it is working."""

    def __init__(self, column: ProgressColumn):
        super().__init__()
        self.column = column

    def render(self, task: Task):
        return self.column.render(task) if task.total is not None else Text("")


class StageDisplay:
    """Listens to `infra.progress`: a row per running stage (indented by nesting), a bar with count, rate and
    ETA once the stage's loop reports steps, and a `done` line with the wall time when the stage ends."""

    def __init__(self, console: Console):
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=24),
                                 OnceCounted(MofNCompleteColumn()), TextColumn("{task.fields[rate]}"),
                                 TimeElapsedColumn(), OnceCounted(TextColumn("eta")),
                                 OnceCounted(TimeRemainingColumn()), TextColumn("{task.fields[extra]}"),
                                 console=console, transient=True)
        self.console = console
        self.rows: dict[str, TaskID] = {}
        self.started: dict[str, float] = {}
        self.running: list[str] = []
        self.counts: dict[str, dict[str, int]] = {}

    def __enter__(self) -> "StageDisplay":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def on_event(self, name: str, event: str, detail: dict) -> None:
        if event == "start":
            self._start(name)
        elif event in ("reused", "built"):
            for stage in self.running:
                self.counts[stage][event] += 1
        elif event == "step":
            self._step(detail)
        elif event == "damaged":
            self.console.print(f"  [yellow]rebuilding[/] {escape(detail['uri'])}: damaged "
                               f"({escape(detail['reason'])})", highlight=False, soft_wrap=True)
        elif event in ("end", "fail"):
            self._finish(name, failed=event == "fail")

    def _start(self, name: str) -> None:
        indent = "  " * len(self.running)
        self.running.append(name)
        self.started[name] = time.perf_counter()
        self.counts[name] = {"reused": 0, "built": 0}
        self.rows[name] = self.progress.add_task(f"{indent}[bold]{name}[/]", total=None, rate="", extra="")

    def _step(self, detail: dict) -> None:
        if not self.running:
            return
        stage = self.running[-1]  # the innermost running stage owns the loop that reports
        elapsed = max(time.perf_counter() - self.started[stage], 1e-6)
        unit = detail.get("unit") or "steps"
        loss = detail.get("loss")
        self.progress.update(self.rows[stage], total=detail["steps"], completed=detail["step"],
                             rate=f"{detail['step'] / elapsed:.1f} {unit}/s",
                             extra=f"loss {loss:.3f}" if loss is not None else "")

    def _finish(self, name: str, failed: bool) -> None:
        if name not in self.rows:
            return
        depth = self.running.index(name) if name in self.running else 0
        self.running = [s for s in self.running if s != name]
        self.progress.remove_task(self.rows.pop(name))
        seconds = time.perf_counter() - self.started.pop(name)
        counts = self.counts.pop(name)
        if failed:
            self.console.print(f"{'  ' * depth}  [red]failed[/] {name} ({seconds:.1f}s)")
            return
        reuse = ("reused" if counts["reused"] and not counts["built"] else
                 f"{counts['built']} built, {counts['reused']} reused" if counts["reused"] else "")
        self.console.print(f"{'  ' * depth}  [green]done[/] {name} ({seconds:.1f}s{', ' + reuse if reuse else ''})",
                           highlight=False)


def _shown(value) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in value.items())
    return str(value)


def summary_text(title: str, summary: dict) -> Text:
    """A result as `key  value` lines, never clipped or wrapped by us: URIs and commands stay whole to copy (a
    table cut them at the terminal's width, and at 80 columns when stdout was a file). Values are text, not
    markup."""
    width = max((len(str(key)) for key in summary), default=0)
    text = Text(f"{title}\n", style="bold")
    for key, value in summary.items():
        text.append(f"  {str(key):<{width}}  ", style="cyan")
        text.append(f"{_shown(value)}\n")
    text.rstrip()
    return text


def curations_table(rows: list[dict]) -> Text:
    """`sftcurate ls`: one block per curation, newest first; the URIs on lines of their own, whole."""
    text = Text()
    for row in rows:
        budget = " + ".join(part for part in (
            f"{row['budget']} examples" if row.get("budget") not in (None, "None") else "",
            f"{row['token_budget']} tokens" if row.get("token_budget") not in (None, "None") else "") if part)
        text.append(f"{row['started']}  ", style="dim")
        text.append(f"{row['name']}", style="bold")
        text.append(f"  {row['method']}  budget {budget or '?'}  kept {row.get('selected', '?')} examples, "
                    f"{row.get('tokens_kept', '?')} tokens of a pool of {row.get('pool_size', '?')}  "
                    f"[{row['status']}]\n")
        text.append(f"    run {row['mlflow_run_id']}  flow run {row.get('flow_run_id') or '-'}\n", style="dim")
        text.append(f"    selection {row.get('selection_uri') or '-'}\n")
        if row.get("curated_uri"):
            text.append(f"    curated   {row['curated_uri']}\n")
    text.rstrip()
    return text
