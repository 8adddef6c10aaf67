"""The typer CLI in a real process (against the test Prefect server): run with overrides and a summary;
user mistakes are one line on stderr, exit code 2, no traceback."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import get_args

import pytest

from sftcurate.core.config import DEFAULT_EXAMPLE_BUDGET
from sftcurate.data_contracts import SELECTION
from sftcurate.infra.store import join, read_table
from tests.conftest import free_port
from tests.helpers import qa_records, write_jsonl

needs_prefect = pytest.mark.usefixtures("prefect_harness")  # the tests that run a flow
EXE = Path(sys.executable).with_name("sftcurate")


def run_cli(*args: str, store: str, **env_vars: str) -> subprocess.CompletedProcess:
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "SFTCURATE_STORE": store, "PREFECT_API_URL": PREFECT_API_URL.value() or "",
           "COLUMNS": "200", **env_vars}
    return subprocess.run([str(EXE), *args], capture_output=True, text=True, env=env, timeout=300)


def write_config(path, uri, budget=8):
    path.write_text(f"name: cli-test\nsource:\n  uri: {uri}\n  heldout_fraction: 0.1\n"
                    f"selection:\n  method: uniform\n  budget: {budget}\nmodels:\n  target: tiny-gpt2\n  max_length: 96\n")
    return path


@needs_prefect
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


@needs_prefect
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


@needs_prefect
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


@needs_prefect
def test_missing_config_file(tmp_path, store_root):
    proc = run_cli("run", str(tmp_path / "nope.yaml"), store=store_root)
    assert proc.returncode == 2 and "config file not found" in proc.stderr


@needs_prefect
def test_a_token_budget_alone_is_the_budget_and_json_on_stdout_is_json_alone(tmp_path, store_root):
    """A token budget with no example budget is not capped by the default 64 examples; `--json -` leaves
    stdout to the JSON (the summary goes to stderr, whole at 60 columns, with the exact export command); the
    run is found again by its config name (`export NAME`) and listed by `ls`."""
    name = f"tokens-only-{uuid.uuid4().hex[:8]}"
    data = write_jsonl(tmp_path / "pool.jsonl", qa_records(160))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"name: {name}\nsource:\n  uri: {data}\n  heldout_fraction: 0.1\nselection:\n  method: uniform\n"
                   "  token_budget: 6000\nmodels:\n  target: tiny-gpt2\n  max_length: 96\n")
    proc = run_cli("run", str(cfg), "--json", "-", store=store_root, COLUMNS="60")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)  # stdout is the JSON and nothing else
    assert summary["budget"] is None and summary["token_budget"] == 6000
    assert summary["selected"] > DEFAULT_EXAMPLE_BUDGET, summary  # not capped by the default example count
    assert 6000 * 0.97 < summary["tokens_kept"] <= 6000, summary  # filled, not stopped at 64
    assert summary["binding_limit"].startswith(f"token_budget: {summary['tokens_kept']:,} of 6,000 tokens")
    lines = proc.stderr.splitlines()
    assert any(line.split() == ["selection_uri", summary["selection_uri"]] for line in lines), proc.stderr[-3000:]
    assert summary["next"] == f"sftcurate export {summary['selection_uri']} --out {name}.jsonl"
    assert any(line.split()[1:] == summary["next"].split() for line in lines if line.strip().startswith("next"))

    exported = run_cli("export", name, "--out", str(tmp_path / "out.jsonl"), "--json", "-", store=store_root)
    assert exported.returncode == 0, exported.stderr[-3000:]
    result = json.loads(exported.stdout)
    assert result["selection_uri"] == summary["selection_uri"] and result["records"] == summary["selected"]
    assert result["found_by"].startswith(f"name {name}")
    picked = read_table(join(summary["selection_uri"], "selection.parquet"), SELECTION).column("id").to_pylist()
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == len(picked)

    listed = run_cli("ls", "--name", name, "--json", "-", store=store_root)
    assert listed.returncode == 0, listed.stderr[-3000:]
    (row,) = json.loads(listed.stdout)
    assert (row["name"], row["method"], row["budget"], row["token_budget"]) == (name, "uniform", None, 6000)
    assert (row["selected"], row["tokens_kept"], row["selection_uri"], row["curated_uri"]) == (
        summary["selected"], summary["tokens_kept"], summary["selection_uri"], summary["curated_uri"])
    shown = run_cli("ls", "--name", name, store=store_root, COLUMNS="60")
    assert summary["selection_uri"] in shown.stdout.split() and "6000 tokens" in shown.stdout


def test_config_show_json_is_the_effective_config_alone(tmp_path, store_root):
    proc = run_cli("config", "show", "--set", "selection.token_budget=4000", "--json", "-", store=store_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shown = json.loads(proc.stdout)
    assert shown["selection"]["token_budget"] == 4000 and shown["selection"]["budget"] is None
    proc = run_cli("config", "init", "--out", str(tmp_path / "c.yaml"), "--json", "-", store=store_root)
    assert proc.returncode == 0 and json.loads(proc.stdout)["wrote"] == str(tmp_path / "c.yaml"), proc.stderr


def test_export_format_choices_are_the_exporters():
    from sftcurate.cli import ExportFormatChoice
    from sftcurate.core.export import ExportFormat

    assert get_args(ExportFormatChoice) == get_args(ExportFormat)


def test_state_lives_in_one_home_per_user_unless_a_project_keeps_its_own(tmp_path, monkeypatch):
    """SFTCURATE_HOME wins; without it a `.sftcurate/` here or above is used; else one per-user home (XDG), so
    a run from a second folder sees the same store, MLflow database and model cache."""
    from sftcurate.infra.settings import load_settings

    monkeypatch.delenv("SFTCURATE_HOME", raising=False)
    monkeypatch.delenv("SFTCURATE_MODEL_CACHE", raising=False)
    monkeypatch.delenv("SFTCURATE_STORE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)   # mlflow.set_tracking_uri exports it (earlier tests)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    seen = []
    for folder in ("first", "second"):
        (tmp_path / folder).mkdir()
        monkeypatch.chdir(tmp_path / folder)
        settings = load_settings()
        seen.append((settings.home, settings.store_uri, settings.tracking_uri, settings.model_cache))
    assert seen[0] == seen[1] == (tmp_path / "data" / "sftcurate", str(tmp_path / "data" / "sftcurate" / "artifacts"),
                                  f"sqlite:///{tmp_path / 'data' / 'sftcurate' / 'mlflow.db'}",
                                  tmp_path / "cache" / "sftcurate" / "models")
    assert not (tmp_path / "first" / ".sftcurate").exists() and not (tmp_path / "second" / ".sftcurate").exists()

    project = tmp_path / "project"
    (project / ".sftcurate").mkdir(parents=True)
    (project / "src").mkdir()
    monkeypatch.chdir(project / "src")  # a project-local home is found from a folder below it, as git finds .git
    assert load_settings().home == project / ".sftcurate"
    assert load_settings().model_cache == tmp_path / "cache" / "sftcurate" / "models"  # no models there: shared
    (project / ".sftcurate" / "models").mkdir()
    assert load_settings().model_cache == project / ".sftcurate" / "models"

    monkeypatch.setenv("SFTCURATE_HOME", str(tmp_path / "mine"))
    assert (load_settings().home, load_settings().model_cache) == (tmp_path / "mine", tmp_path / "mine" / "models")


def test_torch_threads_follow_the_cores_and_the_work_beside_them(tmp_path, monkeypatch):
    """The CPU threads a process may use (SFTCURATE_THREADS, else its affinity mask) are split among the
    sftcurate processes running on the machine and among the shard tasks running at once on the thread runner."""
    import torch

    from sftcurate.infra import runners
    from sftcurate.infra.settings import SettingsError

    monkeypatch.setattr(runners.tempfile, "gettempdir", lambda: str(tmp_path))
    monkeypatch.setattr(runners, "_registered", [])
    monkeypatch.setattr(runners.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5}, raising=False)
    monkeypatch.setattr(runners, "_USER_OMP_THREADS", None)
    monkeypatch.delenv("SFTCURATE_THREADS", raising=False)
    for name in runners.THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert runners.cpu_threads() == 6 and runners.thread_share() == 6
    monkeypatch.setenv("SFTCURATE_THREADS", "4")
    assert runners.cpu_threads() == 4

    runners.register_process()
    beside = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (runners.running_folder() / str(beside.pid)).touch()  # another sftcurate run on this machine
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        (runners.running_folder() / dead.stdout.strip()).touch()  # a mark its killed process left behind
        assert runners.running_processes() == 2 and runners.thread_share() == 2
        assert runners.balance_threads() == 2 and torch.get_num_threads() == 2 and os.environ["OMP_NUM_THREADS"] == "2"
        assert not (runners.running_folder() / dead.stdout.strip()).exists()
        with runners.mapped_tasks(count=8, workers=2):  # two shard tasks at once: one thread each
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    finally:
        beside.kill()
        beside.wait()
    assert runners.running_processes() == 1 and runners.thread_share() == 4
    assert runners.task_runner_from_settings("threads")._max_workers == 4

    monkeypatch.setenv("SFTCURATE_THREADS", "many")
    with pytest.raises(SettingsError, match="SFTCURATE_THREADS='many': expected a whole number of threads >= 1"):
        runners.cpu_threads()


def test_an_unknown_selector_names_the_closest_one():
    from sftcurate.core.config import load_config
    from sftcurate.data_contracts import UserError

    with pytest.raises(UserError, match="selector 'fisher' is unknown; did you mean 'fishersft'\\? choose one of"):
        load_config(None, ["selection.method=fisher"])


@pytest.mark.parametrize("model", ["CurateConfig", "CompareConfig"])
def test_config_init_describes_every_field_and_reads_back_the_same(model):
    import yaml

    from sftcurate.core import config

    cls = getattr(config, model)
    text = config.dump_config(cls(), described=True)
    assert cls.model_validate(yaml.safe_load(text)) == cls()
    described = [f for f in cls.model_fields.values() if f.description]
    assert described and all(f"# {f.description.split()[0]}" in text for f in described)
    assert "# number of loss tokens to keep (cost-aware)" in text or model == "CompareConfig"


def test_ui_plans_the_prefect_server_on_the_local_database_and_mlflow_on_training_runs(monkeypatch, tmp_path):
    """`sftcurate ui` (servers started by hand once: both answer, Ctrl-C stops both): the Prefect server gets the
    local runs' PREFECT_HOME and the UI's API address, MLflow the local store and the experiment's runs page; a
    taken port is one line; servers already set are only pointed at."""
    import socket

    from sftcurate.infra import tracking, ui

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    prefect, mlflow = ui.plan(free_port(), free_port())
    assert prefect.env["PREFECT_HOME"] == os.environ["PREFECT_HOME"]
    assert prefect.env["PREFECT_UI_API_URL"] == f"http://127.0.0.1:{prefect.port}/api"
    assert "PREFECT_API_URL" not in prefect.env
    assert prefect.command[1:3] == ["server", "start"] and str(prefect.port) in prefect.command
    experiment = tracking.client().get_experiment_by_name(tracking.EXPERIMENT)
    assert experiment.tags[tracking.EXPERIMENT_KIND_TAG] == tracking.TRAINING_RUNS  # opens on runs, not GenAI
    assert mlflow.url == f"http://127.0.0.1:{mlflow.port}/#/experiments/{experiment.experiment_id}/runs"
    assert mlflow.command[mlflow.command.index("--backend-store-uri") + 1] == tracking.load_settings().tracking_uri

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ui.UIError, match=f"port {port} is taken; choose another with --prefect-port"):
            ui.plan(port, free_port())

    monkeypatch.setenv("PREFECT_API_URL", "http://prefect.example:4200/api")
    prefect, _ = ui.plan(free_port(), free_port())
    assert (prefect.url, prefect.port, prefect.command) == ("http://prefect.example:4200", None, [])


def test_every_command_takes_json():
    """`--json -` on every command (the README says so); what it writes is checked command by command above."""
    import typer

    from sftcurate.cli import app

    def leaves(command, path=()):
        if hasattr(command, "list_commands"):  # a group (`select` makes its commands from the selector registry)
            context = typer.Context(command)
            for name in command.list_commands(context):
                yield from leaves(command.get_command(context, name), (*path, name))
        else:
            yield path, command

    found = dict(leaves(typer.main.get_command(app)))
    assert {("run",), ("export",), ("ls",), ("ui",), ("config", "show"), ("compare",)} <= set(found)
    missing = [" ".join(path) for path, command in found.items()
               if not any("--json" in getattr(p, "opts", ()) for p in command.params)]
    assert not missing, missing


def test_a_stage_shows_no_count_or_eta_until_its_loop_reports_how_many_steps():
    """Ingest showed `0/?` and `eta -:--:--` for 25 s, which read as stuck; the row shows the spinner and the
    elapsed time until a count is known."""
    import io

    from rich.console import Console

    from sftcurate.terminal import OnceCounted, StageDisplay

    display = StageDisplay(Console(file=io.StringIO(), width=120))
    display.on_event("ingest", "start", {})
    task = display.progress.tasks[display.rows["ingest"]]

    def counted() -> str:
        return " ".join(str(c.render(task)) for c in display.progress.columns if isinstance(c, OnceCounted))

    assert counted().strip() == ""
    display.on_event("ingest", "step", {"step": 3, "steps": 12, "unit": "rows"})
    assert counted().split()[:2] == ["3/12", "eta"]


@needs_prefect
def test_shard_tasks_mapped_on_the_thread_runner_split_the_process_threads():
    """Four shard tasks on a thread runner of two workers: each torch op gets half the process's threads while
    they run, and the process has them all back afterwards."""
    import threading

    import torch
    from prefect import flow
    from prefect.task_runners import ThreadPoolTaskRunner

    from sftcurate.infra.stages import Built
    from sftcurate.tasks.common import map_tasks, stage_task

    seen, lock = [], threading.Lock()

    @stage_task("threads-probe")
    def probe(i: int) -> Built:
        with lock:
            seen.append(torch.get_num_threads())
        return Built(f"mem://{i}", reused=False)

    @flow(task_runner=ThreadPoolTaskRunner(max_workers=2), persist_result=False)
    def mapped() -> list[str]:
        return map_tasks(probe, [(i,) for i in range(4)])

    torch.set_num_threads(4)
    assert mapped() == [f"mem://{i}" for i in range(4)]
    assert seen == [2, 2, 2, 2] and torch.get_num_threads() == 4
