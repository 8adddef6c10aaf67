"""Production on one machine: the local stack (Prefect server, MLflow server with S3 artifacts, S3 API),
the `curate` deployment from prefect.yaml, a run triggered through the Prefect API and executed by a process
worker. Slow (a few minutes); not part of `make test`: run with `make test-services` (pytest -m services)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sftcurate.infra import services
from sftcurate.infra.store import filesystem_for
from tests.conftest import committed_manifests, free_port

pytestmark = [pytest.mark.services, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BUDGET = 10


def run_cli(args: list[str], env: dict, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture
def stack(tmp_path, monkeypatch):
    root = tmp_path / "services"
    ports = services.Ports(prefect=free_port(), mlflow=free_port(), s3=free_port())
    env = services.start(root, ports, home=tmp_path / "home")
    try:
        assert (root / "env.sh").exists() and services.read_env_sh(root)["PREFECT_API_URL"] == env["PREFECT_API_URL"]
        pids = {name: services.read_pid(root, name) for name in services.ORDER}
        assert all(pids.values())
        for key, value in env.items():  # this process reads the bucket and MLflow like a client would
            monkeypatch.setenv(key, value)
        yield root, env
    finally:
        stopped = services.stop(root)
    assert len(stopped) == 3 and not any(services.is_ours(pid, name) for name, pid in pids.items())
    assert not list(root.glob("*.pid"))


def test_deployment_runs_on_a_worker_against_the_stack(stack, tmp_path):
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    root, stack_env = stack
    # Everything the worker's flow subprocess needs travels in the worker's environment: API, store, S3
    # credentials, tracking server, Prefect results (the cache) and the checkout to run from.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(stack_env)
    env["PREFECT_HOME"] = str(tmp_path / "prefect-client")
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"

    run_cli([str(BIN / "prefect"), "work-pool", "create", "sftcurate-local", "--type", "process"], env, REPO, 120)
    deployed = run_cli([str(BIN / "prefect"), "--no-prompt", "deploy", "--name", "curate", "--name", "refresh-nightly"],
                       env, REPO, 300)
    assert "curate/curate" in deployed.stdout and "refresh/refresh-nightly" in deployed.stdout

    config = {"name": "services-test", "source": {"uri": "builtin:python-docs", "limit": 120},
              "selection": {"method": "uniform", "budget": BUDGET, "seed": 5},
              "models": {"target": "tiny-gpt2", "max_length": 128}}
    with temporary_settings({PREFECT_API_URL: stack_env["PREFECT_API_URL"]}):
        with get_client(sync_client=True) as client:
            nightly = client.read_deployment_by_name("refresh/refresh-nightly")
            curate_dep = client.read_deployment_by_name("curate/curate")
        (schedule,) = nightly.schedules
        assert schedule.schedule.cron == "0 3 * * *" and schedule.schedule.timezone == "UTC" and schedule.active
        assert nightly.parameters["config"]["name"] == "refresh"
        # The pull step's {{ $SFTCURATE_REPO }} was filled in from the deploying environment (env.sh).
        assert nightly.pull_steps[0]["prefect.deployments.steps.set_working_directory"]["directory"] == str(REPO)
        # Typed parameters: the UI renders the CurateConfig form (sections with descriptions and defaults).
        schema = curate_dep.parameter_openapi_schema
        assert "config" in schema["properties"] and "SourceConfig" in json.dumps(schema)
        assert "record format; auto detects it from the columns" in json.dumps(schema)

        flow_run = run_deployment("curate/curate", parameters={"config": config}, timeout=0)
        assert flow_run.state.is_scheduled()

        worker_dir = tmp_path / "worker"  # not the checkout: the pull step moves to SFTCURATE_REPO
        worker_dir.mkdir()
        worker = run_cli([str(BIN / "prefect"), "worker", "start", "--pool", "sftcurate-local", "--run-once"],
                         env, worker_dir, 600)
        with get_client(sync_client=True) as client:
            done = client.read_flow_run(flow_run.id)
        assert done.state.type.value == "COMPLETED", (done.state, worker.stdout[-4000:], worker.stderr[-4000:])

    manifests = [m for m in committed_manifests(stack_env["SFTCURATE_STORE"]) if "/selection/" in m]
    assert len(manifests) == 1 and manifests[0].startswith("sftcurate-artifacts/sftcurate/selection/")

    mlflow = MlflowClient(tracking_uri=stack_env["MLFLOW_TRACKING_URI"])
    experiment = mlflow.get_experiment_by_name("sftcurate")
    runs = mlflow.search_runs([experiment.experiment_id],
                              filter_string=f"tags.`prefect.flow_run_id` = '{flow_run.id}'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.metrics["selected"] == BUDGET and runs[0].data.metrics["pool_size"] > BUDGET
    paths = {a.path for a in mlflow.list_artifacts(runs[0].info.run_id, "selection")}
    assert "selection/selection_manifest.json" in paths
    # MLflow's artifacts went through the server to its S3 bucket.
    fs, _ = filesystem_for(f"s3://{services.MLFLOW_BUCKET}/")
    assert any(p.endswith("selection_manifest.json") for p in fs.find(services.MLFLOW_BUCKET))
