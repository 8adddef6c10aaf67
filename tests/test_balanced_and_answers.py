"""The balanced-target loss, the generation metric's checks and intervals, and the per-group held-out split."""
from __future__ import annotations

import json

import numpy as np
import pytest

from sftcurate.core import evidence
from sftcurate.core.answers import answer_check, exact_match, normalized_match
from sftcurate.core.config import SourceConfig
from sftcurate.core.ingest import heldout_mask
from sftcurate.data_contracts import UserError


def skewed_heldout(seed: int, n_common: int = 90, n_rare: int = 10, reps: int = 3):
    """A held-out set where one group is 90% of the examples: the token-weighted mean hardly sees the rare group,
    the balanced loss weighs it as much as the common one."""
    rng = np.random.default_rng(seed)
    groups = ["common"] * n_common + ["rare"] * n_rare
    tokens = rng.integers(20, 40, n_common + n_rare).astype(float)
    per_token = np.where(np.array(groups) == "common", 2.0, 4.0)
    noise = rng.normal(0, 0.05, (reps, len(groups)))
    return (per_token + noise) * tokens, tokens, groups


def test_balanced_loss_weighs_groups_alike():
    loss, tokens, groups = skewed_heldout(0)
    assert evidence.token_mean(loss, tokens) == pytest.approx(2.2, abs=0.05)
    ci = evidence.balanced_bootstrap(loss, tokens, groups)
    assert ci.mean == pytest.approx(3.0, abs=0.02) and ci.low < ci.mean < ci.high and ci.width < 0.2


def test_covering_the_rare_group_wins_on_the_balanced_loss_only():
    """A method that learns the rare group (its loss there 4 -> 3) against one that does not: on the token-weighted
    mean the gain is diluted to ~0.1, on the balanced target it is ~0.5 and called."""
    loss, tokens, groups = skewed_heldout(1)
    rare = np.array(groups) == "rare"
    covers = loss.copy()
    covers[:, rare] = loss[:, rare] * 0.75
    diff = evidence.balanced_bootstrap(covers, tokens, groups, baseline=loss)
    assert diff.mean == pytest.approx(-0.5, abs=0.03) and evidence.verdict(diff, 3) == "better"
    assert evidence.verdict(evidence.balanced_bootstrap(loss, tokens, groups, baseline=covers), 3) == "worse"
    assert evidence.paired_difference(covers, loss, tokens).mean == pytest.approx(-0.1, abs=0.03)


def test_answer_checks():
    assert normalized_match("Paris.", "paris") and normalized_match("The Paris, capital of France", "Paris")
    assert not normalized_match("Parisian", "Paris") and not normalized_match("", "Paris")
    assert exact_match(" 42\nbecause", "42") and not exact_match("42.", "42")
    assert answer_check("exact") is exact_match
    assert answer_check("tests.test_balanced_and_answers:always")("x", "y") is True
    with pytest.raises(UserError, match="generation.check"):
        answer_check("tests.test_balanced_and_answers:missing")


def always(generation: str, reference: str) -> bool:
    return True


def test_rate_interval_and_improvement_verdict():
    rng = np.random.default_rng(2)
    base = (rng.random((1, 200)) < 0.3).astype(float)
    better = np.maximum(base, (rng.random((1, 200)) < 0.4).astype(float))
    diff = evidence.rate_interval(better, base)
    assert diff.low > 0 and evidence.improvement_verdict(diff, 2) == "better"
    assert evidence.improvement_verdict(diff, 1) == "not called (1 replicate)"
    assert evidence.rate_interval(base).mean == pytest.approx(base.mean())


def test_heldout_per_group_is_the_same_split_every_run_and_keeps_training_examples():
    ids = [f"{i:020x}"[::-1] for i in range(60)]
    groups = ["a"] * 40 + ["b"] * 15 + ["c"] * 5
    source = SourceConfig(heldout_per_group=4)
    mask = heldout_mask(ids, groups, source)
    g = np.array(groups)
    assert [int(mask[g == k].sum()) for k in "abc"] == [4, 4, 2]   # c has 5: at most half is held out
    assert np.array_equal(mask, heldout_mask(list(ids), list(groups), source))
    # the lowest id hashes of each group, whatever the order the records came in
    order = np.random.default_rng(0).permutation(60)
    shuffled = heldout_mask([ids[i] for i in order], [groups[i] for i in order], source)
    assert sorted(np.array(ids)[order][shuffled]) == sorted(np.array(ids)[mask])


def test_split_field_names_the_heldout_set_and_a_bad_value_is_one_line(tmp_path):
    from sftcurate.core.ingest import IngestError, build_examples
    from sftcurate.infra.models import resolve_tokenizer

    rows = [{"prompt": f"q{i}", "response": f"answer number {i}", "part": "heldout" if i % 4 == 0 else "train"}
            for i in range(12)]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = SourceConfig(uri=str(path), split_field="part")
    tokenizer = resolve_tokenizer("tiny-gpt2")
    table, _ = build_examples(source, tokenizer, 64)
    held = {p for p, s in zip(table.column("prompt").to_pylist(), table.column("split").to_pylist()) if s == "heldout"}
    assert held == {f"q{i}" for i in range(0, 12, 4)}
    rows[5]["part"] = "test"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(IngestError, match=r"data.jsonl: .*'part' \(source.split_field\) is 'test'"):
        build_examples(source, tokenizer, 64)


def test_generation_input_is_the_trained_text_up_to_the_answer():
    from sftcurate.core.evaluate import rendered_context

    turns = json.dumps({"segments": [["<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCode of France?"
                                      "<|im_end|>\n<|im_start|>assistant\n", False], ["FR<|im_end|>", True],
                                     ["\n", False]], "eos": False})
    assert rendered_context(turns).endswith("Code of France?<|im_end|>\n<|im_start|>assistant\n")
    assert rendered_context("") == ""          # a plain example: its prompt is the model's input as it is
