"""What the commands' bodies share: one `error:` line for what a user or a dependency caused (the exit status
it calls for), and the result shown as `key  value` lines, markdown, or JSON. Imported when a command runs:
its errors module loads pyarrow (`sftcurate.data_contracts`), which `--help` does not need."""
from __future__ import annotations

import logging
from typing import Optional

import typer
from rich.console import Console
from rich.markdown import Markdown
from rich.markup import escape

from sftcurate.cli_io import console, out, stdout_for_json, write_json
from sftcurate.data_contracts.errors import DependencyError, UserError, chain, disk_full
from sftcurate.terminal import summary_text

DISK_FULL_TEXT = "No space left on device"


def one_line_errors() -> tuple[type[BaseException], ...]:
    """Errors the CLI prints as one line, no traceback: a user's mistake (exit 2) and a dependency that stayed
    unreachable through its retry budget, such as the artifact store's endpoint (exit 1)."""
    return (UserError, DependencyError)


class QuietOneLineErrors(logging.Filter):
    """Prefect logs a failed run's traceback and its final state ("Finished in state Failed('... IngestError:
    ...')"); for these errors the CLI's one line says it better, once."""

    def filter(self, record: logging.LogRecord) -> bool:
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


def written_path(exc: BaseException) -> str | None:
    """The file a failed write was writing, as the error says it (`infra.store` names the file it writes on an
    error that names none: a write() on an open file)."""
    return next((str(e.filename) for e in chain(exc) if isinstance(e, OSError) and e.filename), None)


def stop(exc: BaseException) -> None:
    """The CLI's handler for what it catches: one line for a user error, a dependency that stayed down, or a full
    disk (exit 1: free space and run again; the artifact being written was not committed); any other OSError is a
    bug and keeps its traceback."""
    if isinstance(exc, one_line_errors()):
        fail(exc)
    if disk_full(exc):
        where = written_path(exc) or "a write"
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
    message = " ".join(str(exc).split()) or type(exc).__name__  # one line, whatever the message holds
    # escaped: messages quote the user's text ("expected a 2-d [examples, checkpoints] array", "[bold]" in a
    # file name), which rich would otherwise read as markup and drop
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return 1 if isinstance(exc, DependencyError) else 2


def emit(title: str, result, json_out: Optional[str], shown: Optional[dict] = None) -> None:
    """The command's result: as JSON where `--json` says, and as `key  value` lines for people (on stderr when
    stdout carries the JSON). `shown` is what the lines show when it differs from the JSON."""
    if json_out:
        write_json(json_out, result)
    (console if json_out == "-" else out).print(summary_text(title, result if shown is None else shown),
                                                soft_wrap=True, highlight=False)


def show_markdown(target: Console, text: str) -> None:
    """Markdown rendered on a terminal (its tables as tables that fit, not raw lines wrapping mid-row); as it
    is when written to a file or a pipe, for whoever reads it there."""
    if target.is_terminal:
        target.print(Markdown(text))
    else:
        target.print(text, markup=False, highlight=False, soft_wrap=True)


def run_select(method: str, job, json_out: Optional[str]) -> None:
    """`sftcurate select METHOD`: its subcommands come from the selector registry (sftcurate/selectcli.py)."""
    try:
        with stdout_for_json(json_out):
            meta = job()
    except caught() as exc:
        stop(exc)
    emit(f"selection {method}", meta, json_out)
