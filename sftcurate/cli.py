"""The `sftcurate` command line (typer): every command's options and help, nothing heavy.

A command's body lives in the module it needs (`cli_flows`: Prefect and the flows; `cli_export`; `cli_store`:
`ls`, `verify`, `ui`; `cli_config`; `cli_common`: one-line errors and results) and is imported when that
command runs, so `sftcurate --help` and a mistyped option load no pyarrow, Prefect or torch (each import below
inside a command says which heavy library it defers)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Literal, Optional, get_args

import sftcurate.infra  # noqa: F401  (environment defaults before Prefect/MLflow are imported)
import typer

from sftcurate import __version__, cli_io
from sftcurate.cli_io import JSON_HELP, json_option, out
from sftcurate.infra.env import ensure_home
from sftcurate.selectcli import select_app

app = typer.Typer(no_args_is_help=True,
                  help="Pick the most informative subset of an SFT data set, fine-tune on it, prove the gain.")
reproduce_app = typer.Typer(no_args_is_help=True, help="Reproduce experiments from the papers.")
app.add_typer(reproduce_app, name="reproduce")
config_app = typer.Typer(no_args_is_help=True, help="Show or start a configuration (every field, with defaults).")
app.add_typer(config_app, name="config")
# core.export.ExportFormat, spelled out here so `--help` and a bad --format need no heavy import (a test checks
# that the two agree)
ExportFormatChoice = Literal["jsonl", "parquet", "messages", "hf"]


def flow_commands():
    """`cli_flows`, after the home exists: Prefect makes its home (inside ours) without parents on import, or
    fails."""
    ensure_home()
    from sftcurate import cli_flows  # deferred on purpose: Prefect, the flows and torch take seconds

    return cli_flows


@app.command()
def run(config: Path = typer.Argument(..., help="run configuration (YAML)"),
        set_: List[str] = typer.Option([], "--set", help="override a setting: section.key=value"),
        json_out: Optional[str] = json_option()):
    """Run the `curate` flow: ingest -> select -> commit a selection manifest."""
    flow_commands().run_curate(config, set_, json_out)


@app.command()
def refresh(config: Path = typer.Argument(..., help="run configuration (YAML)"),
            set_: List[str] = typer.Option([], "--set", help="override a setting: section.key=value"),
            json_out: Optional[str] = json_option()):
    """Run the `refresh` flow: re-curate if the source data changed (all cache hits if not), report the change."""
    flow_commands().run_refresh(config, set_, json_out)


def run_select(method: str, job, json_out: Optional[str]) -> None:
    """`sftcurate select METHOD`: its subcommands come from the selector registry (sftcurate/selectcli.py)."""
    from sftcurate.cli_common import run_select as run_job  # deferred on purpose: pyarrow

    run_job(method, job, json_out)


app.add_typer(select_app(run_select, JSON_HELP), name="select")


@app.command()
def compare(config: Path = typer.Argument(..., help="comparison configuration (YAML)"),
            set_: List[str] = typer.Option([], "--set", help="override a setting: section.key=value"),
            json_out: Optional[str] = json_option()):
    """Run the `compare` flow: selectors x budgets, fine-tune, held-out loss, pairwise judge."""
    flow_commands().run_compare(config, set_, json_out)


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
    from sftcurate import cli_export  # deferred on purpose: the exporters load torch

    cli_export.export(selection, out_path, fmt, push_to_hub, overwrite, json_out)


@app.command()
def ui(prefect_port: int = typer.Option(4200, help="port of the Prefect UI server started here"),
       mlflow_port: int = typer.Option(5000, help="port of the MLflow UI server started here"),
       json_out: Optional[str] = json_option()):
    """Open the Prefect UI on the local runs' database and the MLflow UI on their tracking store (servers already
    set in PREFECT_API_URL / MLFLOW_TRACKING_URI are used as they are); prints both addresses; Ctrl-C stops them."""
    from sftcurate import cli_store  # deferred on purpose: pyarrow, pydantic

    cli_store.ui(prefect_port, mlflow_port, json_out)


@app.command("ls")
def list_curations(limit: int = typer.Option(20, "--limit", "-n", min=1, help="how many, newest first"),
                   name: Optional[str] = typer.Option(None, help="only the curations of this config name"),
                   json_out: Optional[str] = json_option()):
    """List recent curations (newest first): name, method, budgets, what was kept, and the URIs to export."""
    from sftcurate import cli_store  # deferred on purpose: pyarrow, pydantic

    cli_store.list_curations(limit, name, json_out)


@app.command()
def verify(uri: Optional[str] = typer.Argument(None, help="a store root or one artifact folder (default: "
                                                         "SFTCURATE_STORE)"),
           json_out: Optional[str] = json_option()):
    """Check every committed artifact's files against the sizes and sha256s its manifest records; exit 1 if any
    is damaged (the next run that needs it rebuilds it)."""
    from sftcurate import cli_store  # deferred on purpose: pyarrow, pydantic

    cli_store.verify(uri, json_out)


@reproduce_app.command("synthetic")
def reproduce_synthetic(out_dir: Path = typer.Option(..., "--out", help="folder for the table and plot"),
                        runs: int = typer.Option(20, help="independent runs to average"),
                        seed: int = typer.Option(0),
                        json_out: Optional[str] = json_option()):
    """Section 5.1 of the FisherSFT paper: Uniform vs DensitySampling vs FisherSFT on synthetic data."""
    flow_commands().reproduce_synthetic(out_dir, runs, seed, json_out)


@config_app.command("show")
def config_show(config: Optional[Path] = typer.Argument(None, help="configuration (YAML); none: the defaults"),
                set_: List[str] = typer.Option([], "--set", help="override a setting: section.key=value"),
                compare_config: bool = typer.Option(False, "--compare", help="a comparison configuration"),
                json_out: Optional[str] = json_option()):
    """Print the effective configuration: the file, the --set overrides and every default."""
    from sftcurate import cli_config  # deferred on purpose: the config models load torch

    cli_config.show(config, set_, compare_config, json_out)


@config_app.command("init")
def config_init(out_path: Path = typer.Option(..., "--out", help="file to write (YAML)"),
                compare_config: bool = typer.Option(False, "--compare", help="a comparison configuration"),
                json_out: Optional[str] = json_option()):
    """Write a configuration with every field at its default, to edit."""
    from sftcurate import cli_config  # deferred on purpose: the config models load torch

    cli_config.init(out_path, compare_config, json_out)


def version_callback(value: bool) -> None:
    if value:
        out.print(f"sftcurate {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(version: bool = typer.Option(False, "--version", callback=version_callback, is_eager=True,
                                              help="print the version and exit"),
                 verbose: bool = typer.Option(False, "--verbose", "-v",
                                              help="show library warnings, progress bars and Prefect's log lines")):
    """Pick the most informative subset of an SFT data set, fine-tune on it, prove the gain."""
    cli_io.VERBOSE = verbose
    if not verbose:
        from sftcurate.terminal import quiet_libraries  # deferred on purpose: rich's progress bars (tens of ms)

        quiet_libraries()


def main() -> None:  # pragma: no cover
    sys.exit(app())
