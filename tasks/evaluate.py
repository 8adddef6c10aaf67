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
from typing import Literal

import numpy as np
import pyarrow as pa
from prefect import task
from pydantic import BaseModel, ConfigDict, Field

from data_contracts import GENERATIONS, UserError
from infra import tracking
from infra.hashing import code_fingerprint, fingerprint
from infra.store import ArtifactStore, join, read_bytes, read_table
from tasks.common import TASK_DEFAULTS
from tasks.tokenize import encode_example, length_grouped_batches

EVAL_KIND = "heldout_eval"
GEN_KIND = "generations"


class GenerationConfig(BaseModel):
    """How held-out prompts are drawn and completed; identical for every model of a comparison."""

    model_config = ConfigDict(extra="forbid")

    max_prompts: int = Field(32, gt=0, description="held-out prompts to generate for (and judge)")
    max_new_tokens: int = Field(48, gt=0)
    prompt_words: int = Field(12, gt=0, description="plain text: words of the passage shown as the prompt")
    batch_size: int = Field(8, gt=0)
    max_length: int = Field(256, gt=8, description="prompt tokens kept (from the end) + new tokens")
    decoding: Literal["greedy", "sample"] = Field("greedy")
    temperature: float = Field(0.7, gt=0, description="only for decoding: sample")
    seed: int = Field(0)


def _load(model_uri: str | None, target_spec: str, dtype: str | None = None):
    if model_uri:
        from tasks.finetune import load_finetuned

        return load_finetuned(model_uri)
    from infra.models import resolve_model

    from infra.models import default_device

    loaded = resolve_model(target_spec, dtype=dtype, device=default_device())
    return loaded.model, loaded.tokenizer


def heldout_rows(examples_uri: str) -> list[tuple[str, str, str]]:
    """(id, prompt, response) of the held-out split."""
    from tasks.ingest import load_split

    t = load_split(examples_uri, "heldout")
    return list(zip(t.column("id").to_pylist(), t.column("prompt").to_pylist(), t.column("response").to_pylist()))


# ---------------------------------------------------------------- held-out loss

def heldout_loss(model, tokenizer, rows: list[tuple[str, str]], max_length: int, batch_tokens: int = 8192) -> dict:
    """Token-weighted mean loss over all loss tokens of `rows` ((prompt, response) pairs)."""
    import torch

    from tasks.training import collate, token_loss_sum

    if not rows:
        raise UserError("held-out split is empty; raise source.heldout_fraction or add data")
    encoded = [encode_example(tokenizer, p, r, max_length) for p, r in rows]
    lengths = np.array([len(e.input_ids) for e in encoded])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    total, count = 0.0, 0
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        for idx in length_grouped_batches(lengths, batch_tokens):
            ids, attn, labels = (t.to(device) for t in collate([encoded[i] for i in idx], pad_id))
            s, n = token_loss_sum(model, ids, attn, labels)
            total += float(s)
            count += n
    loss = total / max(count, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": count, "examples": len(rows)}


def evaluate_heldout(examples_uri: str, model_uri: str | None, target_spec: str, target_fingerprint: str,
                     max_length: int, run_id: str | None = None, store_root: str | None = None) -> str:
    """Commit the held-out loss of the fine-tuned model (or of the base model when `model_uri` is None)."""
    store = ArtifactStore(store_root)
    key = fingerprint(examples_uri, model_uri or target_fingerprint, max_length,
                      code_fingerprint("tasks.evaluate", "tasks.tokenize", "tasks.finetune"))
    uri = store.committed(EVAL_KIND, key)
    if not uri:
        model, tokenizer = _load(model_uri, target_spec)
        metrics = heldout_loss(model, tokenizer, [(p, r) for _, p, r in heldout_rows(examples_uri)], max_length)
        writer = store.begin(EVAL_KIND, key)
        writer.write_json("metrics.json", metrics)
        writer.meta.update({**metrics, "model_uri": model_uri, "target_spec": target_spec,
                            "examples_uri": examples_uri, "max_length": max_length})
        uri = writer.commit()
    metrics = read_eval(uri)
    if run_id:
        prefix = "heldout" if model_uri else "base_heldout"
        tracking.log_metrics(run_id, {f"{prefix}/loss": metrics["loss"], f"{prefix}/ppl": metrics["ppl"],
                                      f"{prefix}/tokens": metrics["tokens"]})
    return uri


def read_eval(eval_uri: str) -> dict:
    return json.loads(read_bytes(join(eval_uri, "metrics.json")))


@task(name="heldout-loss", **TASK_DEFAULTS)
def heldout_task(examples_uri: str, model_uri: str | None, target_spec: str, target_fingerprint: str,
                 max_length: int, run_id: str | None = None, store_root: str | None = None) -> str:
    return evaluate_heldout(examples_uri, model_uri, target_spec, target_fingerprint, max_length, run_id, store_root)


# ---------------------------------------------------------------- generations

def generation_prompts(examples_uri: str, cfg: GenerationConfig) -> list[dict]:
    """The seeded held-out prompt sample: [{prompt_id, prompt, reference}], identical for every model."""
    rows = sorted(heldout_rows(examples_uri))
    out = []
    for eid, prompt, response in rows:
        if prompt:
            out.append({"prompt_id": eid, "prompt": prompt, "reference": response})
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
        out.append({"prompt_id": eid, "prompt": head, "reference": response[len(head):]})
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
    import torch

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
    return texts


def generate(examples_uri: str, model_uri: str | None, target_spec: str, target_fingerprint: str,
             cfg: GenerationConfig, run_id: str | None = None, store_root: str | None = None) -> str:
    """Commit the generations of a fine-tuned (or, with `model_uri` None, the base) model."""
    store = ArtifactStore(store_root)
    key = fingerprint(examples_uri, model_uri or target_fingerprint, cfg.model_dump(),
                      code_fingerprint("tasks.evaluate", "tasks.finetune"))
    uri = store.committed(GEN_KIND, key)
    if uri:
        return uri
    prompts = generation_prompts(examples_uri, cfg)
    model, tokenizer = _load(model_uri, target_spec)
    texts = generate_texts(model, tokenizer, [p["prompt"] for p in prompts], cfg)
    table = pa.table({"prompt_id": [p["prompt_id"] for p in prompts], "prompt": [p["prompt"] for p in prompts],
                      "reference": [p["reference"] for p in prompts], "text": texts})
    writer = store.begin(GEN_KIND, key)
    writer.write_table("generations.parquet", table, GENERATIONS)
    writer.meta.update({"model_uri": model_uri, "target_spec": target_spec, "examples_uri": examples_uri,
                        "config": cfg.model_dump(), "n": table.num_rows,
                        "empty": sum(1 for t in texts if not t)})
    uri = writer.commit()
    if run_id:
        tracking.log_metrics(run_id, {"generations/n": table.num_rows,
                                      "generations/mean_chars": float(np.mean([len(t) for t in texts]))})
    return uri


def load_generations(generations_uri: str) -> pa.Table:
    return read_table(join(generations_uri, "generations.parquet"), GENERATIONS)


@task(name="generate", **TASK_DEFAULTS)
def generate_task(examples_uri: str, model_uri: str | None, target_spec: str, target_fingerprint: str,
                  gen_cfg_json: str, run_id: str | None = None, store_root: str | None = None) -> str:
    return generate(examples_uri, model_uri, target_spec, target_fingerprint,
                    GenerationConfig.model_validate_json(gen_cfg_json), run_id, store_root)


__all__ = ["GenerationConfig", "heldout_loss", "evaluate_heldout", "heldout_task", "read_eval",
           "generation_prompts", "generate_texts", "generate", "generate_task", "load_generations"]
