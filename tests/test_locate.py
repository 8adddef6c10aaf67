"""From what a user has at hand to a selection (core/locate.py): the URIs a run prints, a file inside them, the
MLflow run id, the Prefect flow-run id, the config's name (its latest curation); and one line when nothing
matches. The binding-limit sentence of the summary."""
from __future__ import annotations

import uuid

import pytest

from sftcurate.core.config import CurateConfig
from sftcurate.core.locate import SELECTION_TAG, SelectionNotFound, locate_selection, recent_curations
from sftcurate.core.selection import binding_limit
from sftcurate.core.selectors.base import Budget
from sftcurate.infra import tracking
from sftcurate.infra.store import join
from tests.helpers import qa_records, write_jsonl


def curation_config(name: str, data, budget: int) -> CurateConfig:
    return CurateConfig.model_validate({
        "name": name, "source": {"uri": str(data), "heldout_fraction": 0.1},
        "selection": {"method": "uniform", "budget": budget},
        "models": {"target": "tiny-gpt2", "max_length": 96},
    })


@pytest.mark.usefixtures("prefect_harness")
def test_every_handle_a_run_prints_finds_its_selection(tmp_path, store_root):
    from sftcurate.flows.curate import curate

    name = f"locate-{uuid.uuid4().hex[:8]}"
    data = write_jsonl(tmp_path / "pool.jsonl", qa_records(40))
    older = curate(curation_config(name, data, budget=5))
    newer = curate(curation_config(name, data, budget=7))
    assert older["selection_uri"] != newer["selection_uri"]

    found = locate_selection(name)
    assert found.selection_uri == newer["selection_uri"] and "latest" in found.how
    for ref in (older["selection_uri"], older["selection_uri"] + "/", join(older["selection_uri"], "selection.parquet"),
                older["curated_uri"], join(older["curated_uri"], "records.jsonl"), older["mlflow_run_id"],
                older["flow_run_id"], older["flow_run_id"].upper()):
        assert locate_selection(ref).selection_uri == older["selection_uri"], ref

    # a run tracked before the URI tags existed is read from its summary.json
    tracking.client().delete_tag(older["mlflow_run_id"], SELECTION_TAG)
    assert locate_selection(older["mlflow_run_id"]).selection_uri == older["selection_uri"]

    rows = recent_curations(10, name)
    assert [r["mlflow_run_id"] for r in rows] == [newer["mlflow_run_id"], older["mlflow_run_id"]]
    assert [(r["budget"], r["selected"], r["selection_uri"]) for r in rows] == [
        (7, 7, newer["selection_uri"]), (5, 5, older["selection_uri"])]
    assert rows[0]["pool_size"] == newer["pool_size"] and rows[0]["curated_uri"] == newer["curated_uri"]

    with pytest.raises(SelectionNotFound, match=f"did you mean '{name}'"):
        locate_selection(name[:-1])
    with pytest.raises(SelectionNotFound, match="a 'examples' artifact, not a selection"):
        locate_selection(newer["examples_uri"])
    with pytest.raises(SelectionNotFound, match="no committed selection or curated artifact there"):
        locate_selection(str(tmp_path / "nothing-here"))
    with pytest.raises(SelectionNotFound, match="no curation ran as this Prefect flow run"):
        locate_selection(str(uuid.uuid4()))


@pytest.mark.parametrize("budget,selected,tokens,expected", [
    (Budget(tokens=4000), 124, 3990, "token_budget: 3,990 of 4,000 tokens"),
    (Budget(examples=64), 64, 2589, "budget: 64 of 64 examples"),
    (Budget(examples=64, tokens=4000), 64, 2589,
     "budget: 64 of 64 examples (token_budget not reached: 2,589 of 4,000 tokens)"),
    (Budget(examples=200, tokens=4000), 124, 3990,
     "token_budget: 3,990 of 4,000 tokens (budget not reached: 124 of 200 examples)"),
    (Budget(tokens=99999), 500, 9000, "the pool: all 500 examples selected"),
])
def test_the_summary_names_the_limit_that_bound(budget, selected, tokens, expected):
    assert binding_limit(budget, selected, tokens, pool_size=500) == expected


def test_a_token_budget_alone_has_no_example_cap_and_no_budget_at_all_the_default():
    from sftcurate.core.config import DEFAULT_EXAMPLE_BUDGET, SelectionConfig

    assert SelectionConfig(token_budget=4000).examples_budget is None
    assert SelectionConfig().examples_budget == DEFAULT_EXAMPLE_BUDGET
    assert SelectionConfig(budget=10, token_budget=4000).examples_budget == 10


def test_a_compare_cells_run_is_found_by_the_selection_in_its_datasets(store_root):
    """A `compare` cell's MLflow run has no summary of its own; its Datasets column names the selection."""
    with tracking.start_run(f"cell-{uuid.uuid4().hex[:8]}", tags={"method": "uniform"}) as run_id:
        tracking.log_dataset(run_id, "pool", f"{store_root}/examples/abc", "abc", "pool")
        tracking.log_dataset(run_id, "selection", f"{store_root}/selection/def", "def", "training")
    assert locate_selection(run_id).selection_uri == f"{store_root}/selection/def"
    with tracking.start_run("not-a-curation") as other:
        pass
    with pytest.raises(SelectionNotFound, match=f"MLflow run {other} \\('not-a-curation'\\): no selection recorded"):
        locate_selection(other)
