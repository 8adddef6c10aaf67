"""Target fine-tuning on a selection: LoRA (peft) by default, full fine-tuning as an option.

Fair by construction: every selection of the same budget trains with exactly one `FinetuneConfig` (same
steps, batch size, learning rate, schedule, seed); only the data differ. The loss is on response tokens only
(`core.tokenize.encode_example`), batches are grouped by length so little compute goes to padding, and the
batch schedule is a pure function of (selection, seed, step), so a run resumed from a checkpoint takes the
same batches the uninterrupted run would have taken. The loop itself is `core.training.train`, the one the
S2L proxy uses too; this module adds LoRA, the checkpoint layout and the committed result.

Checkpoints (trainable weights + optimizer + RNG + step) are committed artifacts of kind
`finetune_ckpt` every `checkpoint_every` steps, with a `LATEST` pointer written after each commit; the final
adapter (or full model) is the committed artifact of kind `finetuned`. Everything is written through
`infra.store`, so an `s3://` store works the same as a local folder.
"""
from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as load_tensors, save as save_tensors
from transformers import AutoModelForCausalLM

from sftcurate.data_contracts import UserError
from sftcurate.data_contracts.manifests import FinetunedMeta
from sftcurate.infra import tracking
from sftcurate.infra.stages import Built, build_once, content_key, read_meta, stage_key
from sftcurate.infra.models import default_device, resolve_model, resolve_tokenizer
from sftcurate.infra.store import ArtifactStore, is_committed, join, read_bytes, read_manifest, remove_tree, write_bytes
from sftcurate.core.config import FinetuneConfig
from sftcurate.core.ingest import load_pool
from sftcurate.core.selection import load_selection
from sftcurate.core.tokenize import Encoded, encode_pairs, example_rows
from sftcurate.core.training import (Recipe, TrainStats, restore_training_state, steps_for_tokens,
                                     training_state_bytes)
from sftcurate.core.training import train as run_training

log = logging.getLogger("sftcurate.finetune")

KIND = "finetuned"
CKPT_KIND = "finetune_ckpt"
LATEST = "LATEST"
TRAINABLE = "trainable.safetensors"
STATE = "state.pt"

# Architecture (config.model_type) -> LoRA target modules; anything else falls back to every linear layer.
LORA_TARGETS = {
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
}


def recipe(cfg: FinetuneConfig, encoded: list[Encoded] | None = None) -> Recipe:
    """The training recipe; with `cfg.train_tokens`, its steps are those whose batches first hold that many loss
    tokens of `encoded` (so every selection of a comparison trains on the same tokens, within one batch)."""
    steps = cfg.steps
    if cfg.train_tokens is not None:
        if not encoded:
            raise UserError("finetune: the selection is empty; nothing to train on")
        steps = steps_for_tokens(np.array([e.n_loss for e in encoded]), np.array([len(e.input_ids) for e in encoded]),
                                 cfg.batch_size, cfg.seed, cfg.train_tokens, cfg.batching)
    return Recipe(steps=steps, learning_rate=cfg.learning_rate, batch_size=cfg.batch_size, seed=cfg.seed,
                  warmup_ratio=cfg.warmup_ratio, decay="linear", weight_decay=cfg.weight_decay,
                  max_grad_norm=cfg.max_grad_norm, batching=cfg.batching, max_length=cfg.max_length)


def training_rows(examples_uri: str, selection_uri: str) -> list[tuple[str, str, str]]:
    """(prompt, response, turns) of the selected examples, in pick order (joined on example id)."""
    pool = load_pool(examples_uri)
    by_id = {i: k for k, i in enumerate(pool.column("id").to_pylist())}
    table, _ = load_selection(selection_uri)
    pool_rows = example_rows(pool)
    rows = []
    for eid in table.column("id").to_pylist():
        if eid not in by_id:
            raise UserError(f"{selection_uri}: example id {eid} is not in the train split of {examples_uri}; "
                            "the selection was made on another pool: re-run the selection")
        k = by_id[eid]
        rows.append(pool_rows[k])
    if not rows:
        raise UserError(f"{selection_uri}: the selection is empty; raise the budget")
    return rows


# ---------------------------------------------------------------- model

def default_target_modules(model) -> list[str] | str:
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    return LORA_TARGETS.get(model_type, "all-linear")


def prepare_model(model, cfg: FinetuneConfig):
    """Attach LoRA (seeded) or unfreeze everything for full fine-tuning."""
    if cfg.full:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model  # deferred on purpose: peft (seconds), for LoRA only

    targets = cfg.target_modules or default_target_modules(model)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM", bias="none",
                      fan_in_fan_out=getattr(model.config, "model_type", "") == "gpt2")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return get_peft_model(model, lora)


def trainable_state(model) -> dict:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------- checkpoints

@dataclass
class Checkpoints:
    """Committed, resumable checkpoints of one training run (`<store>/finetune_ckpt/<key>/step-NNNNNNN`)."""

    store: ArtifactStore
    key: str

    @property
    def root(self) -> str:
        return self.store.uri(CKPT_KIND, self.key)

    def save(self, step: int, model, optimizer, extra: dict) -> str:
        writer = self.store.begin(CKPT_KIND, f"{self.key}/step-{step:07d}")
        writer.write_bytes(TRAINABLE, save_tensors(trainable_state(model)))
        writer.write_bytes(STATE, training_state_bytes(step, optimizer, extra))
        writer.meta.update({"step": step, **extra})
        uri = writer.commit()
        previous = self.latest_step()
        write_bytes(join(self.root, LATEST), json.dumps({"step": step, "uri": uri}).encode())
        if previous is not None and previous != step:  # keep only the newest committed checkpoint
            remove_tree(self.store.uri(CKPT_KIND, f"{self.key}/step-{previous:07d}"))
        return uri

    def latest_step(self) -> int | None:
        try:
            pointer = json.loads(read_bytes(join(self.root, LATEST)))
        except (FileNotFoundError, OSError, ValueError):
            return None
        return int(pointer["step"]) if is_committed(pointer["uri"]) else None

    def load(self, step: int, model, optimizer) -> dict:
        uri = self.store.uri(CKPT_KIND, f"{self.key}/step-{step:07d}")
        weights = load_tensors(read_bytes(join(uri, TRAINABLE)))
        missing = set(trainable_state(model)) - set(weights)
        if missing:
            raise RuntimeError(f"{uri}: checkpoint lacks {sorted(missing)[:3]}; delete it to restart training")
        model.load_state_dict(weights, strict=False)
        return restore_training_state(read_bytes(join(uri, STATE)), optimizer)

    def clear(self) -> None:
        remove_tree(self.root)


# ---------------------------------------------------------------- training loop

def train(model, tokenizer, encoded: list[Encoded], cfg: FinetuneConfig, *, checkpoints: Checkpoints | None = None,
          run_id: str | None = None) -> TrainStats:
    """Train `model` (already prepared) in place for the recipe's steps; resumes from `checkpoints`."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    plan = recipe(cfg, encoded)
    return run_training(model, pad_id, encoded, plan, checkpoints=checkpoints,
                        save_at=lambda step: step % cfg.checkpoint_every == 0 and step < plan.steps,
                        run_id=run_id, metric_prefix="finetune/", log=log, section="finetune")


# ---------------------------------------------------------------- the committed fine-tune

def _stage(examples_uri: str, selection_uri: str, target_fingerprint: str, cfg: FinetuneConfig) -> dict:
    return {"kind": KIND, "code": __name__, "params": {"target": target_fingerprint, "finetune": cfg},
            "upstream": {"examples": examples_uri, "selection": selection_uri}}


def finetune_key(examples_uri: str, selection_uri: str, target_fingerprint: str, cfg: FinetuneConfig) -> str:
    return stage_key(**_stage(examples_uri, selection_uri, target_fingerprint, cfg))


def fairness_params(cfg: FinetuneConfig, target_spec: str) -> dict:
    """What MLflow records for every fine-tune; identical across methods of one comparison."""
    return {"finetune": {**cfg.model_dump(), "target": target_spec}}


def finetune(examples_uri: str, selection_uri: str, target_spec: str, target_fingerprint: str,
             cfg: FinetuneConfig, run_id: str | None = None, store_root: str | None = None) -> Built:
    """The target fine-tuned on the selection (trained, resuming from its checkpoints, unless committed)."""
    store = ArtifactStore(store_root)

    def build(writer) -> None:
        rows = training_rows(examples_uri, selection_uri)
        loaded = resolve_model(target_spec, dtype=cfg.dtype)
        encoded = encode_pairs(loaded.tokenizer, rows, cfg.max_length)
        model = prepare_model(loaded.model.to(default_device()), cfg)
        stats = train(model, loaded.tokenizer, encoded, cfg, checkpoints=Checkpoints(store, writer.key), run_id=run_id)
        with tempfile.TemporaryDirectory() as tmp:
            if cfg.full:
                model.to("cpu").save_pretrained(tmp, safe_serialization=True)
            else:
                model.save_pretrained(tmp)  # adapter_config.json + adapter_model.safetensors
            for path in sorted(Path(tmp).rglob("*")):
                if path.is_file():
                    writer.write_bytes(path.relative_to(tmp).as_posix(), path.read_bytes())
        n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        writer.meta.update({
            "target_spec": target_spec, "target_fingerprint": target_fingerprint,
            "mode": "full" if cfg.full else "lora", "config": cfg.model_dump(), "examples_uri": examples_uri,
            "selection_uri": selection_uri, "train_examples": len(rows), "steps_done": stats.steps,
            "train_tokens": cfg.train_tokens,
            "tokens_seen": stats.tokens_seen,
            "final_loss": float(np.mean(stats.losses[-max(1, len(stats.losses) // 10):])) if stats.losses else None,
            "resumed_from": stats.resumed_from, "seconds": round(stats.seconds, 3),
            "tokens_per_s": round(stats.tokens_per_s, 1), "padding_fraction": round(stats.padding_fraction, 4),
            "trainable_parameters": int(n_trainable), "torch": torch.__version__,
        })

    uri = build_once(**_stage(examples_uri, selection_uri, target_fingerprint, cfg), build=build,
                     store_root=store_root, meta=FinetunedMeta)
    Checkpoints(store, content_key(uri)).clear()  # the committed model supersedes its checkpoints
    _record(run_id, finetune_meta(uri), cfg, target_spec)
    return uri


def _record(run_id: str | None, meta: FinetunedMeta, cfg: FinetuneConfig, target_spec: str) -> None:
    if not run_id:
        return
    tracking.log_params(run_id, fairness_params(cfg, target_spec))
    metrics = meta.model_dump(include={"steps_done", "train_examples", "tokens_seen", "final_loss", "tokens_per_s",
                                       "padding_fraction", "trainable_parameters"})
    # at the last step: a total logged at step 0 would draw a false dip under the training curve's tokens_seen
    tracking.log_metrics(run_id, {f"finetune/{k}": v for k, v in metrics.items() if v is not None},
                         step=meta.steps_done)


# ---------------------------------------------------------------- loading

def load_finetuned(model_uri: str):
    """(model, tokenizer) of a committed fine-tune, in eval mode; LoRA weights merged into the base."""
    meta = finetune_meta(model_uri)
    files = read_manifest(model_uri)["files"]
    with tempfile.TemporaryDirectory() as tmp:
        for name in files:
            target = Path(tmp) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(read_bytes(join(model_uri, name)))
        if meta.mode == "lora":
            from peft import PeftModel  # deferred on purpose: peft (see prepare_model)

            base = resolve_model(meta.target_spec, dtype=meta.config.get("dtype"))
            model = PeftModel.from_pretrained(base.model, tmp).merge_and_unload()
            tokenizer = base.tokenizer
        else:
            model = AutoModelForCausalLM.from_pretrained(tmp)
            tokenizer = resolve_tokenizer(meta.target_spec)
    model.to(default_device()).eval()
    return model, tokenizer


def finetune_meta(model_uri: str) -> FinetunedMeta:
    """A committed fine-tune's manifest meta, typed: `finetune_meta(uri).steps_done`."""
    return read_meta(model_uri, FinetunedMeta)


__all__ = ["FinetuneConfig", "finetune", "load_finetuned", "finetune_meta", "train", "TrainStats", "prepare_model",
           "default_target_modules", "Checkpoints"]
