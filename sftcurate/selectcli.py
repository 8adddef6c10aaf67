"""`sftcurate select`: one subcommand per registered selector, made from the registry when the group is used
(`sftcurate.selectfiles`), so that `sftcurate --help` and the other commands do not import the selectors and
their inputs' code (torch, transformers)."""
from __future__ import annotations

from typing import Callable, Optional

import typer
from typer.core import TyperGroup


def select_app(run: Callable[[str, Callable[[], dict], Optional[str]], None], json_help: str) -> typer.Typer:
    """`sftcurate select`, one subcommand per registered selector. `run(method, job, json_out)` is the CLI's:
    it calls `job()` under its error handling and shows the result."""

    class Selectors(TyperGroup):
        def list_commands(self, ctx) -> list[str]:
            from sftcurate.core.selectors import REGISTRY  # deferred on purpose: loads torch (see above)

            return list(REGISTRY)

        def get_command(self, ctx, name: str):
            from sftcurate.selectfiles import selector_click_command  # deferred on purpose: loads torch

            return selector_click_command(name, run, json_help)

    return typer.Typer(cls=Selectors, no_args_is_help=True,
                       help="Run one selector on files and write its selection manifest (the same interface for "
                       "every method; `sftcurate select METHOD --help` lists its options).")
