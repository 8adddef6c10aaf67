"""The CI refresh workflow: right triggers, credentials only from secrets, and a command our CLI really has."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml
from typer.testing import CliRunner

from sftcurate.cli import app

REPO = Path(__file__).resolve().parents[1]
WORKFLOW = REPO / ".github" / "workflows" / "curation-refresh.yml"
SECRET_VARS = ("PREFECT_API_URL", "PREFECT_API_KEY", "MLFLOW_TRACKING_URI", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


def load() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def triggers(wf: dict) -> dict:
    return wf.get("on", wf.get(True))  # YAML 1.1 reads a bare `on` key as True


def test_triggers_on_data_or_config_change_and_on_demand():
    on = triggers(load())
    assert "workflow_dispatch" in on
    paths = on["push"]["paths"]
    assert "data/manifest.yaml" in paths and any(p.startswith("configs/") for p in paths)


def test_credentials_come_from_secrets_only():
    wf = load()
    text = WORKFLOW.read_text()
    (job,) = wf["jobs"].values()
    env = {**wf.get("env", {}), **job.get("env", {})}
    for var in SECRET_VARS:
        assert re.fullmatch(r"\$\{\{\s*secrets\.%s\s*\}\}" % var, str(env[var])), f"{var} must come from secrets"
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)  # no AWS access key id pasted in
    assert "testing" not in text  # no moto test keys either


def test_runs_make_install_and_an_existing_refresh_command():
    (job,) = load()["jobs"].values()
    runs = [step["run"] for step in job["steps"] if "run" in step]
    assert "make install" in runs
    (refresh,) = [r for r in runs if "sftcurate refresh" in r]
    argv = shlex.split(refresh)
    assert argv[0] == ".venv/bin/sftcurate" and argv[1] == "refresh"
    default_config = job["env"]["REFRESH_CONFIG"]
    assert (REPO / re.search(r"'([^']+)'", default_config).group(1)).exists()
    options = [a for a in argv[2:] if a.startswith("--")]

    result = CliRunner().invoke(app, ["refresh", "--help"])
    assert result.exit_code == 0, result.output
    for option in options:
        assert option in result.output, f"{option} is not an option of `sftcurate refresh`"
