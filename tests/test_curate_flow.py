"""The curate flow through Prefect's real engine: tracking, cross-run caching, retries, S3 == local."""
from __future__ import annotations

import json

import pytest

from sftcurate.infra import tracking
from sftcurate.infra.store import filesystem_for, join, read_bytes, read_manifest
from sftcurate.core.config import CurateConfig
from sftcurate.core.selection import load_selection
from tests.conftest import committed_manifests
from tests.helpers import qa_records, write_jsonl

pytestmark = pytest.mark.usefixtures("prefect_harness")


def small_config(**selection) -> CurateConfig:
    return CurateConfig.model_validate({
        "name": "test-curation",
        "source": {"uri": "builtin:python-docs", "limit": 120},
        "selection": {"method": "uniform", "budget": 10, "seed": 3, **selection},
        "models": {"target": "tiny-gpt2", "max_length": 128},
    })


def task_states(flow_run_id: str) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name.rsplit("-", 1)[0]: r.state.name for r in runs}


def test_curate_tracks_in_mlflow_and_caches_across_runs(store_root):
    from prefect.client.orchestration import get_client

    from sftcurate.flows.curate import curate

    first = curate(small_config())
    assert first["selected"] == 10 and first["pool_size"] > 10
    table, meta = load_selection(first["selection_uri"])
    assert table.num_rows == 10 and sorted(table.column("rank").to_pylist()) == list(range(10))
    assert first["tokens_kept"] == sum(table.column("tokens").to_pylist())

    run = tracking.client().get_run(first["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["prefect.flow_run_id"] == first["flow_run_id"]
    assert run.data.params["selection.method"] == "uniform" and run.data.params["selection.budget"] == "10"
    assert run.data.metrics["selected"] == 10 and run.data.metrics["tokens_kept"] == first["tokens_kept"]
    artifacts = {a.path for a in tracking.client().list_artifacts(first["mlflow_run_id"], "selection")}
    assert {"selection/selection.parquet", "selection/selection_manifest.json"} <= artifacts

    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}  # the MLflow UI's Datasets column
    assert json.loads(inputs["selection"].dataset.source)["uri"] == first["selection_uri"]
    assert inputs["selection"].dataset.digest == read_manifest(first["selection_uri"])["key"][:36]
    assert json.loads(inputs["pool"].dataset.source)["uri"] == first["examples_uri"]
    assert {t.value for t in inputs["selection"].tags} == {"training"}

    with get_client(sync_client=True) as client:
        keys = [a.key for a in client.read_artifacts()]
        flow_run = client.read_flow_run(first["flow_run_id"])
    assert "curation-summary" in keys and "mlflow-run" in keys  # the flow run leads to its MLflow run
    assert flow_run.name == "test-curation-uniform"  # named after the config, not random words
    assert run.data.tags["prefect.flow_run_name"] == "test-curation-uniform" and run.data.tags["method"] == "uniform"

    second = curate(small_config())
    assert second["selection_uri"] == first["selection_uri"]
    assert set(task_states(second["flow_run_id"]).values()) == {"Reused"}
    assert second["mlflow_run_id"] != first["mlflow_run_id"]  # one MLflow run per flow run

    third = curate(small_config(seed=4))  # a new seed re-selects but reuses the ingest
    states = task_states(third["flow_run_id"])
    assert states["ingest"] == "Reused" and states["select"] == "Completed"


def test_wiped_store_is_rebuilt_not_trusted(store_root):
    from sftcurate.flows.curate import curate

    first = curate(small_config(budget=7))
    fs, path = filesystem_for(store_root)
    fs.rm(path, recursive=True)
    second = curate(small_config(budget=7))
    assert second["selection_uri"] == first["selection_uri"]
    assert read_manifest(second["selection_uri"])["meta"]["selected"] == 7


def test_transient_failure_is_retried_user_error_is_not(tmp_path, store_root, monkeypatch):
    import sftcurate.core.ingest as ingest_module
    from sftcurate.flows.curate import curate

    calls = {"n": 0}
    real = ingest_module.build_examples

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError("transient read error")
        return real(*args, **kwargs)

    monkeypatch.setattr(ingest_module, "build_examples", flaky)
    cfg = small_config()
    cfg.source.uri = str(write_jsonl(tmp_path / "pool.jsonl", qa_records(30)))
    summary = curate(cfg)
    assert calls["n"] == 2 and summary["selected"] == 10

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "response": null}\n')
    cfg.source.uri = str(bad)
    calls["n"] = 10
    with pytest.raises(ValueError, match="field 'response' is null"):
        curate(cfg)
    assert calls["n"] == 11  # bad input fails the same way every time: never retried


def test_budget_larger_than_pool_commits_no_selection(store_root):
    from sftcurate.flows.curate import curate
    from sftcurate.core.selectors.base import BudgetError

    with pytest.raises(BudgetError, match="larger than the pool"):
        curate(small_config(budget=100000))
    assert not [m for m in committed_manifests(store_root) if "/selection/" in m]


def test_s3_store_and_local_store_give_identical_manifests(tmp_path, s3_env, monkeypatch):
    from sftcurate.flows.curate import curate

    local_root = str(tmp_path / "local")
    monkeypatch.setenv("SFTCURATE_STORE", local_root)
    local = curate(small_config(budget=12))
    s3_root = f"s3://{s3_env()}/curations"
    monkeypatch.setenv("SFTCURATE_STORE", s3_root)
    remote = curate(small_config(budget=12))
    assert remote["selection_uri"].startswith("s3://") and local["selection_uri"].startswith(local_root)
    assert read_bytes(join(remote["selection_uri"], "selection.parquet")) == \
        read_bytes(join(local["selection_uri"], "selection.parquet"))
    strip = lambda m: {k: v for k, v in m["meta"].items() if k not in ("examples_uri", "inputs")}  # noqa: E731
    assert strip(read_manifest(remote["selection_uri"])) == strip(read_manifest(local["selection_uri"]))
    assert read_manifest(remote["selection_uri"])["files"] == read_manifest(local["selection_uri"])["files"]
    assert json.loads(read_bytes(join(remote["examples_uri"], "_MANIFEST.json")))["files"] == \
        read_manifest(local["examples_uri"])["files"]
