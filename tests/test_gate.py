"""The quality gate (issue 24): the drop rule; planted garbage (random tokens, another record's answer) dropped
from a synthetic pool scored by a scripted model; the proxy scores; unknown gate settings refused in one line;
a curation behind the gate selects from the gated pool only and reports what it dropped."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from sftcurate.core.config import ConfigError, CurateConfig, load_config
from sftcurate.core.gate import gate_keep
from sftcurate.core.gate_scores import proxy_scores, target_losses
from sftcurate.core.tokenize import encode_pairs, example_rows
from sftcurate.infra.models import resolve_tokenizer


def test_gate_keep_drops_the_worst_share_and_counts_non_finite_scores_as_worst():
    scores = np.array([0.1, 5.0, 0.2, np.nan, 3.0, 0.3, 0.0, 0.4, 0.5, 0.6])
    keep = gate_keep(scores, 0.3)
    assert keep.tolist() == [True, False, True, False, False, True, True, True, True, True]
    assert gate_keep(np.ones(4), 0.5).tolist() == [True, True, False, False]  # ties: later examples first
    assert gate_keep(np.arange(3.0), 0.99).sum() == 1                           # never the whole pool


class ScriptedModel(torch.nn.Module):
    """Knows every clean record by heart: after a prefix of a clean record's tokens it predicts that record's
    next token (logit 12); anywhere else it has no idea (uniform over the vocabulary)."""

    def __init__(self, clean: list[list[int]], vocab: int):
        super().__init__()
        self.vocab = vocab
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # a parameter, so the model has a device
        self.next_token = {tuple(ids[:t + 1]): ids[t + 1] for ids in clean for t in range(len(ids) - 1)}

    def get_output_embeddings(self):
        return None

    def forward(self, input_ids, attention_mask=None):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        for row, ids in enumerate(input_ids.tolist()):
            for t in range(len(ids)):
                nxt = self.next_token.get(tuple(ids[:t + 1]))
                if nxt is not None:
                    logits[row, t, nxt] = 12.0
        return type("Out", (), {"logits": logits})()


def planted_pool(rng):
    countries = ["France", "Spain", "Italy", "Norway", "Chile", "Peru", "Japan", "Kenya", "Egypt", "Nepal",
                 "Ghana", "Laos", "Cuba", "Iran", "Mali", "Oman", "Togo", "Fiji", "Chad", "Iraq"]
    clean = [(f"Describe {c} briefly.", f"{c} is a country with its own history, food and language.")
             for c in countries]
    words = "the of river blue seven quickly under paper mountain glass thin loud".split()
    rows = list(clean)
    rows.append(("Describe Peru briefly.", " ".join(rng.choice(words, 12))))      # random tokens
    rows.append(("Describe Mali briefly.", clean[0][1]))                          # another record's answer
    return rows, [len(clean), len(clean) + 1]


def test_the_gate_drops_planted_garbage_scored_by_a_scripted_model():
    rng = np.random.default_rng(0)
    rows, garbage = planted_pool(rng)
    tokenizer = resolve_tokenizer("tiny-gpt2")
    clean_ids = [e.input_ids for e in encode_pairs(tokenizer, rows[:garbage[0]], 64)]
    model = ScriptedModel(clean_ids, len(tokenizer))
    pool = pa.table({"prompt": [r[0] for r in rows], "response": [r[1] for r in rows]})
    losses = target_losses(model, tokenizer, pool, 64, 4096)
    assert example_rows(pool)[0][:2] == rows[0]
    keep = gate_keep(losses, 2 / len(rows))
    assert np.flatnonzero(~keep).tolist() == garbage
    assert losses[garbage].min() > 10 * losses[~np.isin(np.arange(len(rows)), garbage)].max()


def test_proxy_scores_are_the_last_loss_and_how_little_it_fell():
    losses = np.array([[3.0, 2.0, 1.0], [3.0, 3.1, 3.2], [1.0, 1.0, 0.9]])
    assert proxy_scores(losses, "proxy_final_loss").tolist() == [1.0, 3.2, 0.9]
    assert np.allclose(proxy_scores(losses, "proxy_not_falling"), [-2.0, 0.2, -0.1])
    assert np.flatnonzero(~gate_keep(proxy_scores(losses, "proxy_not_falling"), 0.34)).tolist() == [1]


def test_gate_artifacts_on_askllm_and_proxy_trajectories_score_and_drop_as_declared(store_root):
    from sftcurate.core.config import SourceConfig
    from sftcurate.core.gate import GateConfig
    from sftcurate.core.gate_scores import (dropped_records, gate_on_askllm, gate_on_trajectories, gated_examples,
                                            kept_positions)
    from sftcurate.core.ingest import examples_meta, ingest, load_pool, source_fingerprint
    from sftcurate.core.selectors.askllm import askllm_scores, example_text
    from sftcurate.data_contracts import TRAJECTORIES, TRAJECTORIES_IDS
    from sftcurate.infra.models import resolve_model
    from sftcurate.infra.stages import build_once
    from sftcurate.infra.store import read_manifest

    source = SourceConfig(uri="builtin:python-docs", limit=24)
    examples_uri = ingest(source, source_fingerprint(source), "tiny-gpt2", 64)
    pool = load_pool(examples_uri)
    n = pool.num_rows

    gate_uri = gate_on_askllm(examples_uri, GateConfig(score="askllm", drop=0.25), "tiny-gpt2", 4096, 64)
    loaded = resolve_model("tiny-gpt2")
    p_yes = askllm_scores(loaded.model, loaded.tokenizer, [example_text(p, r) for p, r in zip(
        pool.column("prompt").to_pylist(), pool.column("response").to_pylist())], 4096, 64)
    kept = kept_positions(gate_uri, examples_uri)
    assert len(kept) == n - round(0.25 * n)
    assert sorted(r["index"] for r in dropped_records(gate_uri)) == sorted(set(range(n)) - set(kept.tolist()))
    assert np.allclose([r["score"] for r in dropped_records(gate_uri)],
                       sorted(1 - p_yes, reverse=True)[:n - len(kept)])

    losses = np.tile(np.array([3.0, 2.0, 1.0], np.float32), (n, 1))
    losses[[2, 5], -1] = 3.5                                       # two examples whose loss never falls

    def trajectories(writer) -> None:  # a committed trajectories artifact, as the S2L stage writes one
        writer.write_tensors("trajectories.safetensors", {"losses": losses, "steps": np.array([1, 2, 3])},
                             TRAJECTORIES)
        writer.write_table("ids.parquet", pa.table({"id": pool.column("id"), "pool_index": np.arange(n),
                                                    "source": [""] * n}), TRAJECTORIES_IDS)

    trajectories_uri = build_once("trajectories", __name__, {"planted": [2, 5]}, trajectories)
    gate_uri = gate_on_trajectories(examples_uri, GateConfig(score="proxy_not_falling", drop=2 / n),
                                    trajectories_uri)
    assert [r["index"] for r in dropped_records(gate_uri)] == [2, 5]
    gated = gated_examples(examples_uri, gate_uri)
    assert load_pool(gated).column("id").to_pylist() == [i for k, i in enumerate(pool.column("id").to_pylist())
                                                          if k not in (2, 5)]
    assert examples_meta(gated).n_heldout == examples_meta(examples_uri).n_heldout
    assert read_manifest(gated)["meta"]["gate_dropped"] == 2


def test_unknown_or_mistyped_gate_settings_are_one_line_naming_the_field():
    for overrides, field in ((["selection.gate.share=0.1"], "selection.gate.share"),
                             (["selection.gate.score=perplexity"], "selection.gate.score"),
                             (["selection.gate.drop=1.5"], "selection.gate.drop")):
        with pytest.raises(ConfigError) as err:
            load_config(None, overrides)
        assert f"field '{field}'" in str(err.value) and "\n" not in str(err.value)
    assert load_config(None, ["selection.gate.drop=0.2"]).selection.gate.score == "target_loss"


@pytest.mark.usefixtures("prefect_harness")
def test_a_curation_behind_the_gate_selects_from_the_gated_pool_and_reports_what_it_dropped(store_root):
    from sftcurate.core.gate_scores import dropped_records, gate_markdown
    from sftcurate.core.ingest import examples_meta, load_pool
    from sftcurate.core.selection import load_selection
    from sftcurate.flows.curate import curate

    cfg = CurateConfig.model_validate({
        "name": "gated", "source": {"uri": "builtin:python-docs", "limit": 60},
        "selection": {"method": "uniform", "budget": 5, "gate": {"score": "target_loss", "drop": 0.25}},
        "models": {"target": "tiny-gpt2", "max_length": 64}})
    summary = curate(cfg)
    meta = examples_meta(summary["examples_uri"])
    gate_uri, ungated = meta.gate_uri, meta.gated_from
    n_ungated = examples_meta(ungated).n_train
    assert summary["gate_dropped"] == round(0.25 * n_ungated) == n_ungated - meta.n_train
    assert summary["pool_size"] == meta.n_train and meta.n_heldout == examples_meta(ungated).n_heldout
    dropped = dropped_records(gate_uri)
    kept_ids = set(load_pool(summary["examples_uri"]).column("id").to_pylist())
    assert len(dropped) == summary["gate_dropped"] and not kept_ids & {r["id"] for r in dropped}
    table, _ = load_selection(summary["selection_uri"])
    assert set(table.column("id").to_pylist()) <= kept_ids
    assert min(r["score"] for r in dropped) >= read_threshold(gate_uri)
    report = gate_markdown(gate_uri)
    assert "Quality gate" in report and f"{summary['gate_dropped']:,} of {n_ungated:,} examples dropped" in report
    assert dropped[0]["id"] in report


def read_threshold(gate_uri: str) -> float:
    from sftcurate.infra.store import read_manifest

    return read_manifest(gate_uri)["meta"]["threshold"]
