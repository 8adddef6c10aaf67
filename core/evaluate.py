"""Evaluation of the base and fine-tuned targets: held-out loss / perplexity and held-out generations.

- **Held-out loss**: the token-weighted mean of the per-token loss over every loss token of the held-out split
  (the same `encode_example` tokenization training uses), perplexity = exp(loss).
- **Generations**: for plain text (prompt == "") the paper's protocol: the model sees the first
  `prompt_words` words of a held-out passage and continues it; the rest of the passage is the reference. For
  instruction data the model sees the prompt. Greedy (deterministic) by default, batched with left padding,
  the same seeded prompt sample for every model.
Tasks return artifact URIs (kind `heldout_eval`: metrics.json; kind `generations`: generations.parquet).
"""
from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import torch

from sftcurate.data_contracts import GENERATIONS, HELDOUT_LOSSES, UserError
from sftcurate.infra import progress, tracking
from sftcurate.data_contracts.manifests import GenerationsMeta, HeldoutEvalMeta
from sftcurate.infra.stages import Built, build_once, read_meta
from sftcurate.infra.models import default_device, resolve_model
from sftcurate.infra.store import join, read_bytes, read_table
from sftcurate.core.config import GenerationConfig
from sftcurate.core.finetune import load_finetuned
from sftcurate.core.ingest import load_split
from sftcurate.core.tokenize import encode_pairs, example_rows, length_grouped_batches
from sftcurate.core.training import collate, row_loss_sums

EVAL_KIND = "heldout_eval"
GEN_KIND = "generations"


def _load(model_uri: str | None, target_spec: str, dtype: str | None = None):
    if model_uri:
        return load_finetuned(model_uri)
    loaded = resolve_model(target_spec, dtype=dtype, device=default_device())
    return loaded.model, loaded.tokenizer


def heldout_rows(examples_uri: str, with_turns: bool = False) -> list[tuple]:
    """(id, prompt, response) of the held-out split, and its rendered text (`turns`) with `with_turns`."""
    t = load_split(examples_uri, "heldout")
    columns = ["id", "prompt", "response"] + (["turns"] if with_turns else [])
    return list(zip(*(t.column(c).to_pylist() for c in columns)))


def rendered_context(turns: str) -> str:
    """What the model sees before its first answer in the one text it trains on (`core.training_text`): the chat
    template's system and user turns and the assistant header, or a format string's head; "" for a plain
    example (its prompt is the context as it is)."""
    if not turns.startswith("{"):
        return ""
    context = []
    for text, is_loss in json.loads(turns)["segments"]:
        if is_loss:
            break
        context.append(text)
    return "".join(context)


# ---------------------------------------------------------------- held-out loss

def heldout_losses(model, tokenizer, rows: list[tuple[str, str]], max_length: int,
                   batch_tokens: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """(summed token loss, loss tokens) of every (prompt, response) pair, in input order."""
    if not rows:
        raise UserError("held-out split is empty; raise source.heldout_fraction or add data")
    encoded = encode_pairs(tokenizer, rows, max_length)
    lengths = np.array([len(e.input_ids) for e in encoded])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sums, counts = np.zeros(len(rows)), np.zeros(len(rows), dtype=np.int64)
    device = next(model.parameters()).device
    model.eval()
    done = 0
    with torch.no_grad():
        for idx in length_grouped_batches(lengths, batch_tokens):
            ids, attn, labels = (t.to(device) for t in collate([encoded[i] for i in idx], pad_id))
            s, n = row_loss_sums(model, ids, attn, labels)
            sums[idx], counts[idx] = s.double().cpu().numpy(), n.cpu().numpy()
            done = done + len(idx)
            progress.step("held-out loss", done, len(rows), unit="examples")
    return sums, counts


def loss_metrics(sums: np.ndarray, counts: np.ndarray) -> dict:
    loss = float(sums.sum()) / max(int(counts.sum()), 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": int(counts.sum()), "examples": len(sums)}


def heldout_loss(model, tokenizer, rows: list[tuple[str, str]], max_length: int, batch_tokens: int = 8192) -> dict:
    """Token-weighted mean loss over all loss tokens of `rows` ((prompt, response) pairs)."""
    return loss_metrics(*heldout_losses(model, tokenizer, rows, max_length, batch_tokens))


def evaluate_heldout(examples_uri: str, model_uri: str | None, target_spec: str, target_fingerprint: str,
                     max_length: int, run_id: str | None = None, store_root: str | None = None) -> Built:
    """The held-out loss of the fine-tuned model (or of the base model when `model_uri` is None): the total in
    `metrics.json`, every example's in `losses.parquet` (for intervals and per-group metrics)."""

    def build(writer) -> None:
        heldout = load_split(examples_uri, "heldout")
        model, tokenizer = _load(model_uri, target_spec)
        rows = example_rows(heldout)
        sums, counts = heldout_losses(model, tokenizer, rows, max_length)
        metrics = loss_metrics(sums, counts)
        writer.write_json("metrics.json", metrics)
        writer.write_table("losses.parquet", pa.table({"id": heldout.column("id"), "group": heldout.column("group"),
                                                       "loss_sum": sums, "tokens": counts}), HELDOUT_LOSSES)
        writer.meta.update({**metrics, "model_uri": model_uri, "target_spec": target_spec,
                            "examples_uri": examples_uri, "max_length": max_length})

    uri = build_once(EVAL_KIND, __name__, {"target": target_fingerprint, "max_length": max_length}, build,
                     upstream={"examples": examples_uri, "model": model_uri}, store_root=store_root,
                     meta=HeldoutEvalMeta)
    metrics = read_eval(uri)
    if run_id:
        prefix = "heldout" if model_uri else "base_heldout"
        tracking.log_metrics(run_id, {f"{prefix}/loss": metrics["loss"], f"{prefix}/ppl": metrics["ppl"],
                                      f"{prefix}/tokens": metrics["tokens"]})
    return uri


def read_heldout_losses(eval_uri: str) -> pa.Table:
    return read_table(join(eval_uri, "losses.parquet"), HELDOUT_LOSSES)


def replicate_losses(eval_uris: list[str]) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
    """(held-out ids, loss sums [replicate, example], tokens [example], groups [example]) of replicates that were
    evaluated on the same held-out examples, from their eval artifacts."""
    tables = [read_heldout_losses(uri) for uri in eval_uris]
    ids = tables[0].column("id").to_pylist()
    if any(t.column("id").to_pylist() != ids for t in tables[1:]):
        raise ValueError("replicates were evaluated on different held-out examples")
    loss = np.stack([np.asarray(t.column("loss_sum"), dtype=np.float64) for t in tables])
    return ids, loss, np.asarray(tables[0].column("tokens"), dtype=np.float64), tables[0].column("group").to_pylist()


def read_eval(eval_uri: str) -> dict:
    return json.loads(read_bytes(join(eval_uri, "metrics.json")))


# ---------------------------------------------------------------- generations

def generation_prompts(examples_uri: str, cfg: GenerationConfig) -> list[dict]:
    """The seeded held-out prompt sample: [{prompt_id, prompt, input, reference}], identical for every model."""
    rows = sorted(heldout_rows(examples_uri, with_turns=True))
    out = []
    for eid, prompt, response, turns in rows:
        # `prompt` is what a reader (and the judge) sees; `input` what the model is given: the same text it was
        # fine-tuned on up to its answer (the chat template or format string), so it answers as it learned to
        context = rendered_context(turns)
        if prompt:
            out.append({"prompt_id": eid, "prompt": prompt, "input": context or prompt, "reference": response})
            continue
        words = response.split(" ")
        if len([w for w in words if w]) < cfg.prompt_words + 4:
            continue  # too short to leave anything worth continuing
        kept, seen = [], 0
        for w in words:
            kept.append(w)
            seen += bool(w)
            if seen >= cfg.prompt_words:
                break
        head = " ".join(kept)
        out.append({"prompt_id": eid, "prompt": head, "input": context + head, "reference": response[len(head):]})
    if not out:
        raise UserError(f"{examples_uri}: no held-out example can serve as a generation prompt; "
                        "raise source.heldout_fraction or add data")
    rng = np.random.default_rng(cfg.seed)
    if len(out) > cfg.max_prompts:
        keep = np.sort(rng.choice(len(out), size=cfg.max_prompts, replace=False))
        out = [out[i] for i in keep]
    return out


def generate_texts(model, tokenizer, prompts: list[str], cfg: GenerationConfig) -> list[str]:
    """Continuations of `prompts` (new text only), batched with left padding; greedy unless told otherwise."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    keep = max(1, cfg.max_length - cfg.max_new_tokens)
    n_positions = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    if n_positions:
        keep = max(1, min(keep, n_positions - cfg.max_new_tokens))
    encoded = []
    for p in prompts:
        ids = tokenizer(p, add_special_tokens=False)["input_ids"] if p else []
        encoded.append((ids or [tokenizer.eos_token_id])[-keep:])
    order = np.argsort([len(e) for e in encoded], kind="stable")  # similar lengths share a batch
    texts: list[str] = [""] * len(prompts)
    torch.manual_seed(cfg.seed)
    device = next(model.parameters()).device
    model.eval()
    for start in range(0, len(order), cfg.batch_size):
        idx = order[start:start + cfg.batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        attn = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            e = encoded[i]
            ids[row, width - len(e):] = torch.tensor(e, dtype=torch.long)
            attn[row, width - len(e):] = 1
        kwargs = {"do_sample": cfg.decoding == "sample"}
        if cfg.decoding == "sample":
            kwargs["temperature"] = cfg.temperature
        with torch.no_grad():
            out = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device),
                                 max_new_tokens=cfg.max_new_tokens, pad_token_id=pad_id,
                                 eos_token_id=tokenizer.eos_token_id, **kwargs)
        for row, i in enumerate(idx):
            texts[i] = tokenizer.decode(out[row, width:].tolist(), skip_special_tokens=True).strip()
        progress.step("generate", min(start + cfg.batch_size, len(order)), len(order), unit="prompts")
    return texts


def generate(examples_uri: str, model_uri: str | None, target_spec: str, target_fingerprint: str,
             cfg: GenerationConfig, run_id: str | None = None, store_root: str | None = None) -> Built:
    """The generations of a fine-tuned (or, with `model_uri` None, the base) model for held-out prompts."""

    def build(writer) -> None:
        prompts = generation_prompts(examples_uri, cfg)
        model, tokenizer = _load(model_uri, target_spec)
        texts = generate_texts(model, tokenizer, [p["input"] for p in prompts], cfg)
        table = pa.table({"prompt_id": [p["prompt_id"] for p in prompts], "prompt": [p["prompt"] for p in prompts],
                          "reference": [p["reference"] for p in prompts], "text": texts})
        writer.write_table("generations.parquet", table, GENERATIONS)
        writer.meta.update({"model_uri": model_uri, "target_spec": target_spec, "examples_uri": examples_uri,
                            "config": cfg.model_dump(), "n": table.num_rows,
                            "empty": sum(1 for t in texts if not t),
                            "mean_chars": float(np.mean([len(t) for t in texts])) if texts else 0.0})

    uri = build_once(GEN_KIND, __name__, {"target": target_fingerprint, "generation": cfg}, build,
                     upstream={"examples": examples_uri, "model": model_uri}, store_root=store_root,
                     meta=GenerationsMeta)
    if run_id:
        meta = read_meta(uri, GenerationsMeta)
        tracking.log_metrics(run_id, {"generations/n": meta.n, "generations/mean_chars": meta.mean_chars})
    return uri


def load_generations(generations_uri: str) -> pa.Table:
    return read_table(join(generations_uri, "generations.parquet"), GENERATIONS)


__all__ = ["GenerationConfig", "heldout_loss", "evaluate_heldout", "read_eval",
           "generation_prompts", "generate_texts", "generate", "load_generations"]
