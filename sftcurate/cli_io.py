"""What every command writes: the two consoles (results on stdout, everything else on stderr), the `--json`
option and the JSON it writes. Light on purpose: `sftcurate/cli.py` imports it before `--help` is shown."""
from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

console = Console(stderr=True)
out = Console()
JSON_HELP = "also write the result as JSON to this file (- for stdout: then stdout holds the JSON alone)"
VERBOSE = False  # set by `-v` (`cli.main_options`)


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


def write_json(target: str, obj) -> None:
    text = json.dumps(obj, indent=2, default=str)
    if target == "-":
        sys.stdout.write(text + "\n")  # not through rich: a "[b]" inside a value is data, not markup
        sys.stdout.flush()
    else:
        Path(target).write_text(text)
