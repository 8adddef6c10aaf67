"""The typer CLI in a real process (against the test Prefect server): run with overrides and a summary;
user mistakes are one line on stderr, exit code 2, no traceback."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sftcurate.data_contracts import SELECTION
from sftcurate.infra.store import read_table
from tests.helpers import qa_records, write_jsonl

pytestmark = pytest.mark.usefixtures("prefect_harness")
EXE = Path(sys.executable).with_name("sftcurate")


def run_cli(*args: str, store: str) -> subprocess.CompletedProcess:
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "SFTCURATE_STORE": store, "PREFECT_API_URL": PREFECT_API_URL.value() or "",
           "COLUMNS": "200"}
    return subprocess.run([str(EXE), *args], capture_output=True, text=True, env=env, timeout=300)


def write_config(path, uri, budget=8):
    path.write_text(f"name: cli-test\nsource:\n  uri: {uri}\n  heldout_fraction: 0.1\n"
                    f"selection:\n  method: uniform\n  budget: {budget}\nmodels:\n  target: tiny-gpt2\n  max_length: 96\n")
    return path


def test_run_prints_summary_and_json(tmp_path, store_root):
    data = write_jsonl(tmp_path / "pool.jsonl", qa_records(40))
    cfg = write_config(tmp_path / "c.yaml", data)
    proc = run_cli("run", str(cfg), "--set", "selection.budget=5", "--json", str(tmp_path / "s.json"), store=store_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["selected"] == 5 and summary["method"] == "uniform"
    for field in ("pool_size", "tokens_kept", "selection_uri", "mlflow_run_id"):
        assert field in proc.stdout
    assert "done ingest" in proc.stderr and "done select" in proc.stderr  # progress display
    out = tmp_path / "sel.parquet"  # the same selector interface from files
    proc = run_cli("select", "uniform", "--examples", summary["examples_uri"], "--budget", "4", "--out", str(out),
                   store=store_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_table(str(out), SELECTION).num_rows == 4


NOISE = ("Warning", "warning", "Task run", "Finished in state", "Creating initial", "docs.prefect.io", "%|",
         "Traceback")


def test_a_default_run_of_the_demo_config_is_quiet_and_verbose_shows_everything(tmp_path, store_root):
    """The demo's FisherSFT config (SmolLM2 from its GGUF: transformers' notices, tqdm; several Prefect tasks) on a
    smaller pool: by default the terminal shows the stages and the summary, nothing else; `-v` brings Prefect's
    lines back."""
    demo = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    proc = run_cli("run", str(demo), "--set", "source.limit=24", "--set", "selection.budget=4", store=store_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines and all(line.strip().startswith("done ") for line in lines), proc.stderr[-3000:]
    assert any("done embedding" in line or "done token_features" in line for line in lines), lines
    assert not [n for n in NOISE if n in proc.stderr + proc.stdout], proc.stderr[-3000:]
    verbose = run_cli("-v", "run", str(demo), "--set", "source.limit=24", "--set", "selection.budget=4",
                      store=store_root)
    assert verbose.returncode == 0 and "Finished in state" in verbose.stderr, verbose.stderr[-3000:]


@pytest.mark.parametrize("args,expected", [
    (["--set", "selection.budget=-1"], "budget must be > 0"),
    (["--set", "selection.budget=100000"], "larger than the pool"),
    (["--set", "selection.method=nope"], "selector 'nope' is unknown"),
    (["--set", "source.uri=/no/such.jsonl"], "/no/such.jsonl: file not found"),
    (["--set", "selection.bogus=1"], "field 'selection.bogus'"),
    (["--set", "source.uri=BAD"], "line 2: field 'response' must be a string, got int"),
])
def test_user_errors_are_one_line(tmp_path, store_root, args, expected):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "response": "ok"}\n{"prompt": "p", "response": 3}\n')
    args = [a.replace("BAD", str(bad)) for a in args]
    cfg = write_config(tmp_path / "c.yaml", write_jsonl(tmp_path / "pool.jsonl", qa_records(20)))
    proc = run_cli("run", str(cfg), *args, store=store_root)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and expected in lines[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout


def test_missing_config_file(tmp_path, store_root):
    proc = run_cli("run", str(tmp_path / "nope.yaml"), store=store_root)
    assert proc.returncode == 2 and "config file not found" in proc.stderr
