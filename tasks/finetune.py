"""Target fine-tuning on a selection: LoRA (peft) by default, full fine-tuning as an option.

Fair by construction: every selection of the same budget trains with exactly one `FinetuneConfig` (same
steps, batch size, learning rate, schedule, seed); only the data differ. The loss is on response tokens only
(`tasks.tokenize.encode_example`), batches are grouped by length so little compute goes to padding, and the
batch schedule is a pure function of (selection, seed, step), so a run resumed from a checkpoint takes the
same batches the uninterrupted run would have taken. The loop itself is `tasks.training.train`, the one the
S2L proxy uses too; this module adds LoRA, the checkpoint layout and the committed result.

Checkpoints (trainable weights + optimizer + RNG + step) are committed artifacts of kind
`finetune_ckpt` every `checkpoint_every` steps, with a `LATEST` pointer written after each commit; the final
adapter (or full model) is the committed artifact of kind `finetuned`. Everything is written through
`infra.store`, so an `s3://` store works the same as a local folder.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from prefect import task
from pydantic import BaseModel, ConfigDict, Field

from data_contracts import UserError
from infra import tracking
from infra.hashing import code_fingerprint, fingerprint
from infra.models import default_device
from infra.store import ArtifactStore, is_committed, join, read_bytes, read_manifest, remove_tree, write_bytes
from tasks.common import TASK_DEFAULTS, task_logger
from tasks.tokenize import Encoded, encode_pairs
from tasks.training import Recipe, TrainStats, restore_training_state, training_state_bytes
from tasks.training import train as run_training

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


class FinetuneConfig(BaseModel):
    """The one training recipe every selection of a budget shares."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(100, gt=0, description="optimizer steps (fixed, not epochs: every selection gets the same)")
    learning_rate: float = Field(5e-4, gt=0)
    batch_size: int = Field(8, gt=0, description="examples per step")
    max_length: int = Field(256, gt=8, description="max tokens per example (prompt + response)")
    seed: int = Field(0, description="seeds the adapter init, the batch order and dropout")
    full: bool = Field(False, description="full fine-tuning instead of LoRA")
    lora_r: int = Field(8, gt=0)
    lora_alpha: int = Field(16, gt=0)
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | None = Field(None, description="LoRA modules; default chosen per architecture")
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, gt=0)
    batching: Literal["length_grouped", "random", "pad_to_max"] = Field(
        "length_grouped", description="length_grouped: similar lengths share a batch (little padding); "
        "random: pad to the batch's longest; pad_to_max: pad every batch to max_length (baseline)")
    checkpoint_every: int = Field(50, gt=0, description="commit a resumable checkpoint every N steps")
    dtype: Literal["float32", "bfloat16"] = Field("float32")

    def recipe(self) -> Recipe:
        return Recipe(steps=self.steps, learning_rate=self.learning_rate, batch_size=self.batch_size, seed=self.seed,
                      warmup_ratio=self.warmup_ratio, decay="linear", weight_decay=self.weight_decay,
                      max_grad_norm=self.max_grad_norm, batching=self.batching, max_length=self.max_length)


# ---------------------------------------------------------------- data

def training_rows(examples_uri: str, selection_uri: str) -> list[tuple[str, str]]:
    """(prompt, response) of the selected examples, in pick order (joined on example id)."""
    from tasks.ingest import load_pool
    from tasks.selection import load_selection

    pool = load_pool(examples_uri)
    by_id = {i: k for k, i in enumerate(pool.column("id").to_pylist())}
    table, _ = load_selection(selection_uri)
    prompts, responses = pool.column("prompt").to_pylist(), pool.column("response").to_pylist()
    rows = []
    for eid in table.column("id").to_pylist():
        if eid not in by_id:
            raise UserError(f"{selection_uri}: example id {eid} is not in the train split of {examples_uri}; "
                            "the selection was made on another pool: re-run the selection")
        k = by_id[eid]
        rows.append((prompts[k], responses[k]))
    if not rows:
        raise UserError(f"{selection_uri}: the selection is empty; raise the budget")
    return rows


# ---------------------------------------------------------------- model

def default_target_modules(model) -> list[str] | str:
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    return LORA_TARGETS.get(model_type, "all-linear")


def prepare_model(model, cfg: FinetuneConfig):
    """Attach LoRA (seeded) or unfreeze everything for full fine-tuning."""
    import torch

    if cfg.full:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

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
        from safetensors.torch import save as save_tensors

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
        from safetensors.torch import load as load_tensors

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

class SimulatedCrash(RuntimeError):
    """Raised by `train(crash_after=N)` after step N (before a checkpoint of step N); tests prove resumption."""


def train(model, tokenizer, encoded: list[Encoded], cfg: FinetuneConfig, *, checkpoints: Checkpoints | None = None,
          run_id: str | None = None, crash_after: int | None = None) -> TrainStats:
    """Train `model` (already prepared) in place for exactly `cfg.steps` steps; resumes from `checkpoints`."""

    def crash(step: int, _loss: float) -> None:
        if crash_after is not None and step >= crash_after:
            raise SimulatedCrash(f"simulated crash after step {step}")

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return run_training(model, pad_id, encoded, cfg.recipe(), checkpoints=checkpoints,
                        save_at=lambda step: step % cfg.checkpoint_every == 0 and step < cfg.steps,
                        run_id=run_id, metric_prefix="finetune/", on_step=crash,
                        log=task_logger("sftcurate.finetune"), section="finetune")


# ---------------------------------------------------------------- the committed fine-tune

def finetune_key(examples_uri: str, selection_uri: str, target_fingerprint: str, cfg: FinetuneConfig) -> str:
    return fingerprint(examples_uri, selection_uri, target_fingerprint, cfg.model_dump(),
                       code_fingerprint("tasks.finetune", "tasks.tokenize", "tasks.training"))


def fairness_params(cfg: FinetuneConfig, target_spec: str) -> dict:
    """What MLflow records for every fine-tune; identical across methods of one comparison."""
    return {"finetune": {**cfg.model_dump(), "target": target_spec}}


def finetune(examples_uri: str, selection_uri: str, target_spec: str, target_fingerprint: str,
             cfg: FinetuneConfig, run_id: str | None = None, store_root: str | None = None,
             crash_after: int | None = None) -> str:
    """Fine-tune the target on the selection (or return the committed result); returns the model URI."""
    from infra.models import resolve_model

    store = ArtifactStore(store_root)
    key = finetune_key(examples_uri, selection_uri, target_fingerprint, cfg)
    existing = store.committed(KIND, key)
    if existing:
        _record(run_id, read_manifest(existing)["meta"], cfg, target_spec)
        return existing
    import torch

    rows = training_rows(examples_uri, selection_uri)
    loaded = resolve_model(target_spec, dtype=cfg.dtype)
    encoded = encode_pairs(loaded.tokenizer, rows, cfg.max_length)
    model = prepare_model(loaded.model.to(default_device()), cfg)
    checkpoints = Checkpoints(store, key)
    stats = train(model, loaded.tokenizer, encoded, cfg, checkpoints=checkpoints, run_id=run_id,
                  crash_after=crash_after)
    writer = store.begin(KIND, key)
    with tempfile.TemporaryDirectory() as tmp:
        if cfg.full:
            model.to("cpu").save_pretrained(tmp, safe_serialization=True)
        else:
            model.save_pretrained(tmp)  # adapter_config.json + adapter_model.safetensors
        for path in sorted(Path(tmp).rglob("*")):
            if path.is_file():
                writer.write_bytes(path.relative_to(tmp).as_posix(), path.read_bytes())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    meta = {
        "target_spec": target_spec, "target_fingerprint": target_fingerprint, "mode": "full" if cfg.full else "lora",
        "config": cfg.model_dump(), "examples_uri": examples_uri, "selection_uri": selection_uri,
        "train_examples": len(rows), "steps_done": stats.steps, "tokens_seen": stats.tokens_seen,
        "final_loss": float(np.mean(stats.losses[-max(1, len(stats.losses) // 10):])) if stats.losses else None,
        "resumed_from": stats.resumed_from, "seconds": round(stats.seconds, 3),
        "tokens_per_s": round(stats.tokens_per_s, 1), "padding_fraction": round(stats.padding_fraction, 4),
        "trainable_parameters": int(n_trainable), "torch": torch.__version__,
    }
    writer.meta.update(meta)
    uri = writer.commit()
    checkpoints.clear()
    _record(run_id, meta, cfg, target_spec)
    return uri


def _record(run_id: str | None, meta: dict, cfg: FinetuneConfig, target_spec: str) -> None:
    if not run_id:
        return
    tracking.log_params(run_id, fairness_params(cfg, target_spec))
    tracking.log_metrics(run_id, {f"finetune/{k}": meta[k] for k in (
        "steps_done", "train_examples", "tokens_seen", "final_loss", "tokens_per_s", "padding_fraction",
        "trainable_parameters") if meta.get(k) is not None})


@task(name="finetune", **TASK_DEFAULTS)
def finetune_task(examples_uri: str, selection_uri: str, target_spec: str, target_fingerprint: str,
                  finetune_cfg_json: str, run_id: str | None = None, store_root: str | None = None) -> str:
    return finetune(examples_uri, selection_uri, target_spec, target_fingerprint,
                    FinetuneConfig.model_validate_json(finetune_cfg_json), run_id, store_root)


# ---------------------------------------------------------------- loading

def load_finetuned(model_uri: str):
    """(model, tokenizer) of a committed fine-tune, in eval mode; LoRA weights merged into the base."""
    from infra.models import resolve_model, resolve_tokenizer

    meta = read_manifest(model_uri)["meta"]
    files = read_manifest(model_uri)["files"]
    with tempfile.TemporaryDirectory() as tmp:
        for name in files:
            target = Path(tmp) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(read_bytes(join(model_uri, name)))
        if meta["mode"] == "lora":
            from peft import PeftModel

            base = resolve_model(meta["target_spec"], dtype=meta["config"].get("dtype"))
            model = PeftModel.from_pretrained(base.model, tmp).merge_and_unload()
            tokenizer = base.tokenizer
        else:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(tmp)
            tokenizer = resolve_tokenizer(meta["target_spec"])
    model.to(default_device()).eval()
    return model, tokenizer


def finetune_meta(model_uri: str) -> dict:
    return read_manifest(model_uri)["meta"]


__all__ = ["FinetuneConfig", "finetune", "finetune_task", "load_finetuned", "finetune_meta",
           "train", "TrainStats", "prepare_model", "default_target_modules", "Checkpoints", "SimulatedCrash"]
