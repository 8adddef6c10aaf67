"""The `compare` flow end to end on tiny data: tiny-gpt2 target, tiny-gpt2 hf judge, real Prefect engine."""
from __future__ import annotations

import numpy as np
import pytest

from sftcurate.data_contracts import EVAL_RESULTS
from sftcurate.infra import tracking
from sftcurate.infra.store import join, read_bytes, read_manifest, read_table
from sftcurate.core.config import ConfigError
from sftcurate.core.selectors.base import Selector, SelectionResult, fill_in_order, register
from tests.helpers import qa_records, write_jsonl


@register
class LongestFirst(Selector):
    """A deterministic test selector (longest examples first), so the comparison has two distinct methods."""

    name = "test_longest"

    def select(self, inputs, budget, seed):
        return SelectionResult(indices=fill_in_order(np.argsort(-inputs.token_counts, kind="stable"),
                                                     inputs.token_counts, budget))


def config(tmp_path, budgets, *extra):
    from sftcurate.flows.compare import load_compare_config

    data = write_jsonl(tmp_path / "qa.jsonl", qa_records(60))
    return load_compare_config(None, ["budget_unit=examples", "reference_full=false", "epochs=1",
        f"source.uri={data}", "source.heldout_fraction=0.2", "models.target=tiny-gpt2", "models.max_length=96",
        "methods=[test_longest]", f"budgets={budgets}", "finetune.steps=6", "finetune.batch_size=4",
        "finetune.learning_rate=0.01", "judge.backend=hf", "judge.model=tiny-gpt2", "judge.max_prompts=4",
        "judge.max_new_tokens=6", "judge.n_bootstrap=200", "name=tiny-compare", *extra])


def test_config_errors_are_one_line(tmp_path):
    from sftcurate.flows.compare import load_compare_config

    with pytest.raises(ConfigError, match="budgets"):
        load_compare_config(None, ["budgets=[]"])
    with pytest.raises(ConfigError, match="finetune.stepz"):
        load_compare_config(None, ["finetune.stepz=3"])
    cfg = load_compare_config(None, ["models.max_length=64", "methods=[fishersft]"])
    assert cfg.finetune.max_length == 64 and cfg.all_methods == ["uniform", "fishersft"]


def test_compare_flow_end_to_end_and_adding_a_budget_reruns_only_what_is_new(tmp_path, store_root, prefect_harness):
    from sftcurate.flows.compare import compare

    summary = compare(config(tmp_path, [8]))
    assert summary["methods"] == ["uniform", "test_longest"] and summary["budgets"] == [8]
    rows = {(r["method"], r["budget"]): r for r in summary["rows"]}
    assert set(rows) == {("base", 0), ("uniform", 8), ("test_longest", 8)}
    for b in (8,):
        r = rows[("test_longest", b)]
        assert 0.0 <= r["win_rate_vs_uniform"] <= 1.0 and r["win_rate_ci_low"] <= r["win_rate_ci_high"]
        assert r["wins"] + r["losses"] + r["ties"] + r["errors"] == 4
        assert rows[("uniform", b)]["win_rate_vs_uniform"] is None
        assert np.isfinite(r["heldout_loss"]) and r["heldout_loss"] < rows[("base", 0)]["heldout_loss"]
    # identical token compute for every cell: the uniform selection's loss tokens x epochs (1 here)
    assert len({c["train_tokens"] for c in summary["cells"].values()}) == 1
    assert all(c["steps_done"] > 0 for c in summary["cells"].values())
    assert "randomly initialised" in summary["judge_note"]
    md = summary["table_markdown"]
    assert "Win rate vs Uniform" in md and "Held-out loss" in md and "test_longest" in md
    assert "position bias" in md and "length bias (longer text won)" in md and "length-controlled" in md

    report = summary["report_uri"]
    assert read_bytes(join(report, "results.png"))[:4] == b"\x89PNG"
    csv_text = read_bytes(join(report, "results.csv")).decode()
    header = csv_text.splitlines()[0]
    assert header.startswith("method,budget,heldout_loss,heldout_ppl,loss_ci_low,loss_ci_high,delta_vs_uniform")
    assert ("position_bias,longer_won,lc_win_rate,uniform_worst_group,worst_group_delta,"
            "worst_group_delta_ci_low,worst_group_delta_ci_high,worst_group_verdict,balanced_loss") in header
    assert header.endswith("answer_delta_ci_low,answer_delta_ci_high,answer_verdict")
    # the balanced-target loss and the generation metric, each with an interval and a paired difference
    assert "## Balanced-target loss" in md and "## Generation metric" in md
    test_row = rows[("test_longest", 8)]
    assert test_row["balanced_ci_low"] <= test_row["balanced_loss"] <= test_row["balanced_ci_high"]
    assert test_row["balanced_delta"] is not None and test_row["answer_match"] is not None
    assert 0.0 <= test_row["answer_match"] <= 1.0 and test_row["answer_delta"] is not None
    table = read_table(join(report, "results.parquet"), EVAL_RESULTS)
    assert table.num_rows == 3

    # MLflow: one parent run, one child run per cell, each child with the same fine-tuning params
    client = tracking.client()
    parent = summary["mlflow_run_id"]
    children = client.search_runs([tracking.experiment_id()], f"tags.mlflow.parentRunId = '{parent}'")
    assert len(children) == 2
    ft = [{k: v for k, v in c.data.params.items() if k.startswith("finetune.")} for c in children]
    assert all(p == ft[0] for p in ft) and ft[0]["finetune.train_tokens"] == str(summary["train_tokens"]["8"])
    assert {c.data.tags["method"] for c in children} == {"uniform", "test_longest"}
    assert any("judge/win_rate" in c.data.metrics for c in children)
    assert {a.path for a in client.list_artifacts(parent, "report")} >= {"report/results.md", "report/results.png"}

    # a new budget: only the new cells are computed; the old ones are reused as they were
    before = {k: read_manifest(c["model_uri"])["created"] for k, c in summary["cells"].items()}
    again = compare(config(tmp_path, [8, 12]))
    assert set(again["cells"]) == set(summary["cells"]) | {"uniform@12", "test_longest@12"}
    assert len(again["rows"]) == 5 and "| test_longest |" in again["table_markdown"]
    for k, created in before.items():
        assert again["cells"][k]["model_uri"] == summary["cells"][k]["model_uri"]
        assert read_manifest(again["cells"][k]["model_uri"])["created"] == created
        for stage in ("selection_uri", "eval_uri", "generations_uri", "judgments_uri"):
            assert again["cells"][k].get(stage) == summary["cells"][k].get(stage)




def test_compare_rerun_commits_nothing_new_and_a_wiped_store_comes_back_the_same(tmp_path, store_root,
                                                                                  prefect_harness):
    import shutil

    from sftcurate.flows.compare import compare
    from tests.conftest import committed_manifests

    cfg = config(tmp_path, [8])
    first = compare(cfg)
    committed = committed_manifests(store_root)
    created = {m: read_bytes(m) for m in committed}

    again = compare(cfg)  # every stage reused: not even the report is committed again
    assert again["report_uri"] == first["report_uri"] and again["rows"] == first["rows"]
    assert committed_manifests(store_root) == committed
    assert all(read_bytes(m) == data for m, data in created.items())

    shutil.rmtree(store_root)
    rebuilt = compare(cfg)
    assert rebuilt["report_uri"] == first["report_uri"] and committed_manifests(store_root) == committed
    assert {k: c["selection_uri"] for k, c in rebuilt["cells"].items()} == \
        {k: c["selection_uri"] for k, c in first["cells"].items()}


def test_every_cell_trains_on_the_same_loss_tokens_with_replicates_and_the_full_pool(tmp_path, store_root,
                                                                                   prefect_harness):
    from sftcurate.core.evaluate import read_heldout_losses
    from sftcurate.flows.compare import compare

    cfg = config(tmp_path, [300], "budget_unit=tokens", "epochs=2", "replicates=2", "reference_full=true",
                 "finetune.batch_size=4", "judge.max_prompts=2")
    assert cfg.budget_unit == "tokens" and cfg.reference_full and cfg.replicates == 2
    summary = compare(cfg)
    assert summary["methods"] == ["uniform", "test_longest", "full"] and summary["train_tokens"] == {"300": 600}
    cells = summary["cells"]
    assert set(cells) == {f"{m}@300{r}" for m in ("uniform", "test_longest", "full") for r in ("", "#1")}
    # token-equal compute: every cell (the full pool too) trained on 600 loss tokens, to within one batch
    longest = max(read_heldout_losses(cells["uniform@300"]["eval_uri"]).column("tokens").to_pylist())
    seen = {k: read_manifest(c["model_uri"])["meta"]["tokens_seen"] for k, c in cells.items()}
    assert all(abs(s - 600) <= 4 * 96 / 2 for s in seen.values()), seen
    assert max(seen.values()) - min(seen.values()) < 4 * max(longest, 96)
    # replicates draw other seeds: uniform's two selections and the fine-tune seeds differ
    assert cells["uniform@300"]["selection_uri"] != cells["uniform@300#1"]["selection_uri"]
    assert read_manifest(cells["uniform@300#1"]["model_uri"])["meta"]["config"]["seed"] == 1
    rows = {(r["method"], r["budget"]): r for r in summary["rows"]}
    for method in ("test_longest", "full"):
        r = rows[(method, 300)]
        assert r["replicates"] == 2 and r["loss_ci_low"] <= r["heldout_loss"] <= r["loss_ci_high"]
        assert r["delta_ci_low"] <= r["delta_vs_uniform"] <= r["delta_ci_high"]
        assert r["verdict"] == ("better" if r["delta_ci_high"] < 0 else "worse" if r["delta_ci_low"] > 0
                                else "no difference")
        assert r["groups"] == 1 and r["groups_covered"] == 1 and r["worst_group"].endswith("qa.jsonl")
    assert rows[("uniform", 300)]["verdict"] is None
    # every number in the report comes from the artifacts: recompute uniform's mean from its held-out losses
    tables = [read_heldout_losses(cells[k]["eval_uri"]) for k in ("uniform@300", "uniform@300#1")]
    mean = np.mean([np.sum(t.column("loss_sum")) / np.sum(t.column("tokens")) for t in tables])
    assert rows[("uniform", 300)]["heldout_loss"] == pytest.approx(mean)
    md = summary["table_markdown"]
    assert "Difference to uniform" in md and "| full |" in md and "worst group" in md and "600 at 300" in md
