"""Issue 11, fault 1: runs started together in a fresh SFTCURATE_HOME all succeed.

Measured before the fix: one of the runs died in MLflow's SQLite set-up ("table ... already exists", "Online
migration expected to match one row") because every process created and migrated the new tracking database at
once; and a home folder that did not exist yet made Prefect's ephemeral server fail to open its database.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.faults

CONFIG = """name: concurrent
source: {uri: 'builtin:python-docs', limit: 40}
selection: {method: uniform, budget: 5}
models: {target: tiny-gpt2, max_length: 64}
"""
RUNS = 3


@pytest.mark.slow  # three full runs, each starting its own Prefect server (about a minute on two cores)
def test_runs_started_together_in_a_fresh_home_all_succeed(tmp_path):
    from mlflow.tracking import MlflowClient

    home = tmp_path / "home"  # not created yet: the very first runs on this machine
    config = tmp_path / "tiny.yaml"
    config.write_text(CONFIG)
    env = {k: v for k, v in os.environ.items() if k not in (
        "SFTCURATE_STORE", "MLFLOW_TRACKING_URI", "PREFECT_API_URL", "PREFECT_HOME", "SFTCURATE_MODEL_CACHE")}
    # each run starts its own ephemeral Prefect server (the default); three at once on two busy cores are slow
    env.update(SFTCURATE_HOME=str(home), COLUMNS="200", PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="400")
    start = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", "from sftcurate.cli import app; app()", "run", str(config),
                               "--json", str(tmp_path / f"summary-{i}.json")],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(RUNS)]
    results = [p.communicate(timeout=600) for p in procs]
    print(f"{RUNS} runs together: {time.perf_counter() - start:.1f}s")
    for proc, (_, err) in zip(procs, results):
        assert proc.returncode == 0, err[-4000:]
    summaries = [json.loads((tmp_path / f"summary-{i}.json").read_text()) for i in range(RUNS)]
    assert len({s["selection_uri"] for s in summaries}) == 1
    assert all(s["selected"] == 5 for s in summaries)

    tracking = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    runs = tracking.search_runs([tracking.get_experiment_by_name("sftcurate").experiment_id])
    assert sorted(r.info.run_id for r in runs) == sorted(s["mlflow_run_id"] for s in summaries)
    assert {r.info.status for r in runs} == {"FINISHED"}
