"""The refresh flow: nothing costly runs when the source is unchanged; a change is re-curated and reported."""
from __future__ import annotations

import json
import re

import pytest

import sftcurate.core.ingest
import sftcurate.core.selection
from sftcurate.infra import tracking
from sftcurate.core.config import CurateConfig
from tests.helpers import qa_records, write_jsonl
from tests.test_curate_flow import task_states

pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture
def counters(monkeypatch) -> dict:
    """Count executions of the costly plain functions (building examples, running a selector)."""
    calls = {"build_examples": 0, "selection_table": 0}

    def counting(module, name):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    counting(sftcurate.core.ingest, "build_examples")
    counting(sftcurate.core.selection, "selection_table")
    return calls


def refresh_config(path) -> CurateConfig:
    return CurateConfig.model_validate({
        "name": "Refresh Test", "source": {"uri": str(path), "heldout_fraction": 0.1},
        "selection": {"method": "uniform", "budget": 8, "seed": 1},
        "models": {"target": "tiny-gpt2", "max_length": 96},
    })


def test_refresh_is_free_when_unchanged_and_reports_changes(tmp_path, store_root, counters):
    from prefect.client.orchestration import get_client

    from sftcurate.flows.refresh import read_state, refresh
    from sftcurate.core.ingest import example_id

    records = qa_records(40)
    data = write_jsonl(tmp_path / "data.jsonl", records)
    cfg = refresh_config(data)

    first = refresh(cfg)
    assert first["first_refresh"] and first["fingerprint_before"] is None
    assert counters == {"build_examples": 1, "selection_table": 1}
    state = read_state(cfg.name)
    assert state["examples_uri"] == first["examples_uri"] and state["source_fingerprint"] == first["fingerprint_after"]
    assert first["state_uri"].startswith(store_root) and re.search(r"refresh-state/refresh-test-[0-9a-f]{12}\.json$", first["state_uri"])

    second = refresh(cfg)
    assert counters == {"build_examples": 1, "selection_table": 1}  # nothing costly ran
    assert set(task_states(second["curate_flow_run_id"]).values()) == {"Reused"}
    assert not second["source_changed"] and not second["selection_changed"]
    assert second["fingerprint_before"] == second["fingerprint_after"] == first["fingerprint_after"]
    assert second["examples_added"] == 0 and second["examples_removed"] == 0

    removed = [example_id(r["prompt"], r["response"]) for r in records[:2]]
    new = qa_records(45)[40:]
    write_jsonl(data, records[2:] + new)
    third = refresh(cfg)
    assert counters == {"build_examples": 2, "selection_table": 2}
    assert third["source_changed"] and third["fingerprint_before"] == first["fingerprint_after"]
    assert third["fingerprint_after"] != third["fingerprint_before"]
    assert third["added_ids"] == sorted(example_id(r["prompt"], r["response"]) for r in new)
    assert third["removed_ids"] == sorted(removed)
    assert (third["examples_added"], third["examples_removed"]) == (5, 2)
    assert read_state(cfg.name)["examples_uri"] == third["examples_uri"] != first["examples_uri"]

    run = tracking.client().get_run(third["mlflow_run_id"])
    assert run.data.metrics["examples_added"] == 5 and run.data.metrics["examples_removed"] == 2
    assert run.data.metrics["source_changed"] == 1
    assert run.data.params["fingerprint_before"] == third["fingerprint_before"]
    with get_client(sync_client=True) as client:
        artifacts = [a for a in client.read_artifacts() if a.key == "refresh-refresh-test"]
    assert artifacts and any(removed[0] in (a.data or "") for a in artifacts)


def test_refresh_cli(tmp_path, store_root):
    from typer.testing import CliRunner

    from sftcurate.cli import app

    data = write_jsonl(tmp_path / "data.jsonl", qa_records(30))
    config = tmp_path / "refresh.yaml"
    config.write_text(f"name: cli-refresh\nsource: {{uri: {data}}}\nselection: {{budget: 5}}\n"
                      "models: {target: tiny-gpt2, max_length: 96}\n")
    out = tmp_path / "report.json"
    result = CliRunner().invoke(app, ["refresh", str(config), "--set", "selection.seed=2", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["first_refresh"] and report["examples_after"] == 30
    assert "fingerprint_after" in result.output


def test_refresh_state_of_names_that_slug_alike_never_collides(store_root):
    from sftcurate.flows.refresh import read_state, slug, state_uri, write_state

    names = ["a/b", "a-b", "A B", "курация", "キュレーション", "curation"]
    assert len({slug(n) for n in names}) < len(names)  # the slugs collide...
    assert len({state_uri(n) for n in names}) == len(names)  # ...the state files do not
    for i, name in enumerate(names):
        write_state(name, {"name": name, "examples_uri": f"e{i}"})
    assert [read_state(n)["examples_uri"] for n in names] == [f"e{i}" for i in range(len(names))]
    assert "refresh-state/curation-" in state_uri("курация")  # still readable where it can be


def test_a_state_under_the_old_slug_only_name_is_read_for_its_own_name_only(store_root):
    import json

    from sftcurate.flows.refresh import STATE_DIR, read_state
    from sftcurate.infra.store import join, write_bytes

    write_bytes(join(store_root, STATE_DIR, "a-b.json"), json.dumps({"name": "a/b", "examples_uri": "old"}).encode())
    assert read_state("a/b")["examples_uri"] == "old"
    assert read_state("a-b") is None
