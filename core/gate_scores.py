"""The quality gate's scores (`core.gate`), an artifact of their own (kind `gate`): one score per pool example
(higher is worse), the kept mask, and the dropped records with their scores, which the curation report and
MLflow show.

`target_loss` runs the target model once over the pool (the batched, length-grouped loss pass that S2L uses
for its trajectories, `core.trajectories.example_losses`); `askllm` once more with Ask-LLM's prompt; the two
proxy scores read the S2L trajectories artifact, so a gate on them costs nothing more when the selector is
S2L.
"""
from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa

from sftcurate.core.gate import GateConfig, gate_keep
from sftcurate.core.ingest import KIND as EXAMPLES_KIND, examples_fingerprint, load_examples, load_pool
from sftcurate.core.inputs import load_trajectories_file
from sftcurate.core.selectors.askllm import askllm_scores, example_text
from sftcurate.core.selectors.base import check_pool_alignment
from sftcurate.core.tokenize import encode_pairs, example_rows
from sftcurate.core.trajectories import example_losses
from sftcurate.data_contracts import EXAMPLES, ContractError
from sftcurate.data_contracts.manifests import ExamplesMeta, GateMeta
from sftcurate.infra.models import model_fingerprint, resolve_model
from sftcurate.infra.stages import Built, build_once, read_meta
from sftcurate.infra.store import join, read_bytes, read_manifest

KIND = "gate"
REPORT_ROWS = 20      # dropped records shown in the curation report (all of them are in `dropped.jsonl`)
PREVIEW_CHARS = 100


def target_losses(model, tokenizer, pool, max_length: int, batch_tokens: int) -> np.ndarray:
    """Mean loss per loss token of every pool example under `model` (float32 [N]), on the one text of each."""
    encoded = encode_pairs(tokenizer, example_rows(pool), max_length)
    device = next(model.parameters()).device
    return example_losses(model, encoded, batch_tokens, str(device))


def proxy_scores(losses: np.ndarray, score: str) -> np.ndarray:
    """The proxy's loss at its last checkpoint, or that minus its first (how much the loss failed to fall)."""
    losses = np.asarray(losses, dtype=np.float64)
    if losses.ndim != 2 or losses.shape[1] < (2 if score == "proxy_not_falling" else 1):
        raise ValueError(f"gate: trajectories of shape {losses.shape} cannot give '{score}'")
    return losses[:, -1] if score == "proxy_final_loss" else losses[:, -1] - losses[:, 0]


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def commit_gate(examples_uri: str, gate: GateConfig, scores_of_pool, key_params: dict,
                upstream: dict | None = None) -> Built:
    """The gate artifact for the pool: `scores_of_pool(pool)` gives the scores (called only when not committed)."""

    def build(writer) -> None:
        pool = load_pool(examples_uri)
        scores = np.asarray(scores_of_pool(pool), dtype=np.float64)
        if scores.shape != (pool.num_rows,):
            raise ValueError(f"gate: {scores.shape} scores for a pool of {pool.num_rows} examples")
        keep = gate_keep(scores, gate.drop)
        ids, responses = pool.column("id").to_pylist(), pool.column("response").to_pylist()
        dropped = sorted(np.flatnonzero(~keep).tolist(), key=lambda i: (-scores[i], i))
        writer.write_bytes("scores.npy", _npy(scores))
        writer.write_bytes("kept.npy", _npy(keep))
        lines = [json.dumps({"index": i, "id": ids[i], "score": float(scores[i]), "response": responses[i]},
                            ensure_ascii=False) for i in dropped]
        writer.write_bytes("dropped.jsonl", ("\n".join(lines) + "\n" if lines else "").encode())
        kept_scores = scores[keep]
        writer.meta.update({
            "score": gate.score, "drop": gate.drop, "pool_size": int(pool.num_rows), "dropped": len(dropped),
            "kept": int(keep.sum()), "examples_key": read_manifest(examples_uri)["key"],
            "threshold": float(kept_scores.max()) if len(kept_scores) else None,
            "score_quantiles": {q: float(np.quantile(scores, float(q))) for q in ("0.1", "0.5", "0.9")}
            if len(scores) else {},
        })

    return build_once(KIND, __name__, {"score": gate.score, "drop": gate.drop, **key_params}, build,
                      upstream={"examples": examples_uri, **(upstream or {})}, meta=GateMeta)


def gate_on_target_loss(examples_uri: str, gate: GateConfig, model_spec: str, max_length: int,
                        batch_tokens: int) -> Built:
    def scores_of_pool(pool):
        loaded = resolve_model(model_spec)
        return target_losses(loaded.model, loaded.tokenizer, pool, max_length, batch_tokens)

    return commit_gate(examples_uri, gate, scores_of_pool,
                       {"model": model_fingerprint(model_spec), "max_length": max_length})


def gate_on_askllm(examples_uri: str, gate: GateConfig, model_spec: str, batch_tokens: int,
                    max_length: int) -> Built:
    def scores_of_pool(pool):
        loaded = resolve_model(model_spec)
        texts = [example_text(p, r) for p, r in zip(pool.column("prompt").to_pylist(),
                                                     pool.column("response").to_pylist())]
        return 1.0 - askllm_scores(loaded.model, loaded.tokenizer, texts, batch_tokens, max_length)

    return commit_gate(examples_uri, gate, scores_of_pool,
                       {"model": model_fingerprint(model_spec), "max_length": max_length})


def gate_on_trajectories(examples_uri: str, gate: GateConfig, trajectories_uri: str) -> Built:
    def scores_of_pool(pool):
        losses, _steps, ids = load_trajectories_file(trajectories_uri)
        check_pool_alignment(trajectories_uri, ids, pool, "trajectories")
        return proxy_scores(losses, gate.score)

    return commit_gate(examples_uri, gate, scores_of_pool, {}, upstream={"trajectories": trajectories_uri})


def gated_examples(examples_uri: str, gate_uri: str) -> Built:
    """The examples artifact without the pool examples the gate drops (held-out examples are kept whole): every
    later stage (token features, trajectories, any selector, the curated records) sees the gated pool only, so
    the gate composes with every selector and the dropped examples are never embedded."""

    def build(writer) -> None:
        table = load_examples(examples_uri)
        train = np.asarray(table.column("split").to_pylist()) == "train"
        keep_rows = ~train
        keep_rows[np.flatnonzero(train)[kept_positions(gate_uri, examples_uri)]] = True
        table = table.filter(pa.array(keep_rows))
        gated_train = np.asarray(table.column("split").to_pylist()) == "train"
        writer.write_table("examples.parquet", table, EXAMPLES)
        writer.meta.update({
            **read_meta(examples_uri, ExamplesMeta).model_dump(exclude_unset=True),
            "fingerprint": examples_fingerprint(table),
            "n_examples": table.num_rows, "n_train": int(gated_train.sum()),
            "train_tokens": int(np.asarray(table.column("response_tokens"))[gated_train].sum()),
            "gate_uri": gate_uri, "gated_from": examples_uri, "gate_dropped": read_meta(gate_uri, GateMeta).dropped,
        })

    return build_once(EXAMPLES_KIND, __name__, {"gate": True}, build,
                      upstream={"examples": examples_uri, "gate": gate_uri}, meta=ExamplesMeta)


def kept_positions(gate_uri: str, examples_uri: str) -> np.ndarray:
    """The pool positions the gate keeps, ascending, after checking the gate was made for this pool."""
    if read_meta(gate_uri, GateMeta).examples_key != read_manifest(examples_uri)["key"]:
        raise ContractError(f"{gate_uri}: these gate scores were computed for another pool than {examples_uri}; "
                            "re-run the gate for this pool")
    return np.flatnonzero(np.load(io.BytesIO(read_bytes(join(gate_uri, "kept.npy")))))


def dropped_records(gate_uri: str) -> list[dict]:
    text = read_bytes(join(gate_uri, "dropped.jsonl")).decode()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def gate_markdown(gate_uri: str) -> str:
    """The gate's section of the curation report: what it scored, the threshold, and the worst dropped records."""
    meta = read_meta(gate_uri, GateMeta)
    dropped = dropped_records(gate_uri)
    quantiles = ", ".join(f"q{float(q):.1f} {v:.3f}" for q, v in meta.score_quantiles.items())
    rows = "\n".join(f"| {r['index']} | `{r['id']}` | {r['score']:.3f} | "
                     f"{' '.join(r['response'].split())[:PREVIEW_CHARS].replace('|', '/')} |"
                     for r in dropped[:REPORT_ROWS])
    threshold = "none" if meta.threshold is None else f"{meta.threshold:.3f}"
    return (f"## Quality gate\n\nScore `{meta.score}` (higher is worse), drop share {meta.drop}: "
            f"**{meta.dropped:,} of {meta.pool_size:,} examples dropped** before selecting; the highest "
            f"kept score is {threshold}. Pool scores: {quantiles}. All dropped records with their scores: "
            f"`{join(gate_uri, 'dropped.jsonl')}`.\n\n| pool index | id | score | response |\n|---|---|---|---|\n"
            f"{rows}\n")
