"""S2L proxy training: a small causal LM trained on the whole pool, saving T evenly spaced checkpoints.

The proxy artifact is one folder in the store, `<root>/proxy/<key>/`:

    tokenizer/                  the proxy tokenizer (+ its own _MANIFEST.json)
    base/                       LoRA on tiny-gpt2 only: the random-init base the adapters sit on
    checkpoints/step-0000020/   model files (save_pretrained: full weights, or the LoRA adapter),
                                training_state.pt (optimizer, torch RNG, step), _MANIFEST.json written last
    ...
    checkpoints.json, _MANIFEST.json    the proxy manifest, written after the last checkpoint

Every checkpoint is committed on its own, so a run that dies (or a Prefect retry) resumes from the last
committed checkpoint instead of starting over. The data order is a pure function of (seed, step), the
learning rate of the step number, dropout is off (training draws no random numbers), and the AdamW state
(with the torch RNG state, for completeness) travels in the checkpoint, so a resumed run ends with exactly
the weights of an uninterrupted one. The loop is `core.training.train`, shared with target fine-tuning; this
module adds the proxy's model construction and checkpoint layout.

Everything goes through fsspec (`infra.store`), so an `s3://` store root works as well as a local folder.
"""
from __future__ import annotations

import hashlib
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import torch
from fsspec.implementations.local import LocalFileSystem

from sftcurate.data_contracts import UserError
from sftcurate.data_contracts.manifests import ProxyMeta
from sftcurate.infra.local_cache import local_copy
from sftcurate.infra.models import (TINY, build_tiny_gpt2, loading_lock, model_fingerprint, resolve_device,
                                   resolve_model)
from sftcurate.infra.settings import load_settings
from sftcurate.infra.stages import Built, build_once, read_meta
from sftcurate.infra.store import (
    ArtifactWriter, MANIFEST, filesystem_for, is_committed, join, read_bytes,
)
from sftcurate.core.config import ProxyConfig
from sftcurate.core.ingest import load_pool
from sftcurate.core.tokenize import encode_pairs, example_rows
from sftcurate.core.training import Recipe, restore_training_state, train, training_state_bytes

log = logging.getLogger("sftcurate.proxy")

KIND = "proxy"
LORA_DEFAULTS = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0}
WARMUP_FRACTION = 0.05
MIN_LR_FRACTION = 0.1


class ProxyError(UserError):
    """A proxy setting that cannot work (more checkpoints than steps, an empty pool): fix the config."""


def disable_dropout(model) -> None:
    """Training draws no random numbers (the official S2L proxy, Pythia, has no dropout either), so the run is
    deterministic even when other threads use torch's global RNG at the same time."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


# ---------------------------------------------------------------- pool and keys

def as_proxy_config(proxy: ProxyConfig | dict) -> ProxyConfig:
    return proxy if isinstance(proxy, ProxyConfig) else ProxyConfig.model_validate(proxy)


def training_params(cfg: ProxyConfig) -> dict:
    """The ProxyConfig fields that change the trained weights (trajectory-only knobs are left out of the key)."""
    return {k: v for k, v in cfg.model_dump().items() if k not in ("batch_tokens", "shard_size")}


def checkpoint_steps(steps: int, checkpoints: int) -> list[int]:
    """T evenly spaced steps ending at the last one (no step-0 checkpoint: random-init losses carry no signal)."""
    if steps < checkpoints:
        raise ProxyError(f"proxy.steps ({steps}) must be >= proxy.checkpoints ({checkpoints}); raise proxy.steps "
                         "or lower proxy.checkpoints")
    return [int(round(steps * (k + 1) / checkpoints)) for k in range(checkpoints)]


def checkpoint_uri(proxy_uri: str, step: int) -> str:
    return join(proxy_uri, "checkpoints", f"step-{step:07d}")


# ---------------------------------------------------------------- store <-> local folders

def upload_folder(writer: ArtifactWriter, folder: Path, prefix: str = "") -> None:
    for f in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        writer.write_bytes(f"{prefix}{f.relative_to(folder).as_posix()}", f.read_bytes())


def local_dir(uri: str) -> Path:
    """A local folder holding a committed store folder: the folder itself when local, else a cached copy named
    by its URI and manifest (a re-committed folder gets a new copy)."""
    fs, path = filesystem_for(uri)
    if isinstance(fs, LocalFileSystem):
        return Path(path)
    manifest = read_bytes(join(uri, MANIFEST))
    name = hashlib.sha256(uri.encode() + manifest).hexdigest()[:16]
    return local_copy(uri, load_settings().model_cache / "proxy", name)


def save_pretrained_folder(obj, store_uri: str, kind: str, meta: dict, extra: dict[str, bytes] | None = None) -> str:
    """save_pretrained into a temp dir, upload every file, commit (manifest last)."""
    writer = ArtifactWriter(uri=store_uri, kind=kind, key=store_uri.rsplit("/", 1)[-1])
    writer.abort()
    with tempfile.TemporaryDirectory() as tmp:
        obj.save_pretrained(tmp)
        upload_folder(writer, Path(tmp))
    for name, data in (extra or {}).items():
        writer.write_bytes(name, data)
    writer.meta.update(meta)
    return writer.commit()


# ---------------------------------------------------------------- model construction

def _wrap_lora(model):
    from peft import LoraConfig, get_peft_model  # deferred on purpose: peft (seconds), for a LoRA proxy only

    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA_DEFAULTS))


def build_fresh(proxy_spec: str, cfg: ProxyConfig, corpus: tuple[str, ...], proxy_uri: str):
    """(model, tokenizer) at step 0; the tokenizer (and a tiny LoRA base) are committed to the artifact."""
    if proxy_spec.startswith(TINY):
        loaded = build_tiny_gpt2(proxy_spec, corpus=corpus)
    else:
        loaded = resolve_model(proxy_spec)
    model, tokenizer = loaded.model, loaded.tokenizer
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    # A run killed after these commits but before the first checkpoint starts again here: what is committed is
    # used as it is, never written again (a committed artifact is never rewritten).
    if is_committed(join(proxy_uri, "tokenizer")):
        tokenizer = load_tokenizer(proxy_uri)
    else:
        save_pretrained_folder(tokenizer, join(proxy_uri, "tokenizer"), "proxy_tokenizer", {"spec": proxy_spec})
    if cfg.lora:
        if proxy_spec.startswith(TINY):
            if is_committed(join(proxy_uri, "base")):
                model = load_base(proxy_uri, proxy_spec)
            else:
                save_pretrained_folder(model, join(proxy_uri, "base"), "proxy_base", {"spec": proxy_spec})
        # LoRA init draws from torch's global RNG: seeded under the one model-construction lock
        with loading_lock(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = _wrap_lora(model)
    return model, tokenizer


def load_tokenizer(proxy_uri: str):
    folder = str(local_dir(join(proxy_uri, "tokenizer")))
    with loading_lock() as tf:
        tok = tf.AutoTokenizer.from_pretrained(folder)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base(proxy_uri: str, proxy_spec: str):
    if is_committed(join(proxy_uri, "base")):
        folder = str(local_dir(join(proxy_uri, "base")))
        with loading_lock() as tf:
            return tf.AutoModelForCausalLM.from_pretrained(folder)
    return resolve_model(proxy_spec).model


def load_checkpoint_model(proxy_uri: str, ckpt_uri: str, proxy_spec: str, lora: bool, trainable: bool = False):
    """The model of one committed checkpoint (LoRA adapters merged for inference unless `trainable`). Under the
    model-loading lock: shard tasks on a thread runner load checkpoints at the same time."""
    folder = str(local_dir(ckpt_uri))
    with loading_lock() as tf:
        if not lora:
            return tf.AutoModelForCausalLM.from_pretrained(folder)
        from peft import PeftModel  # deferred on purpose: peft (see _wrap_lora)

        model = PeftModel.from_pretrained(load_base(proxy_uri, proxy_spec), folder, is_trainable=trainable)
        return model if trainable else model.merge_and_unload()


# ---------------------------------------------------------------- training

def train_proxy(examples_uri: str, proxy_spec: str, proxy: ProxyConfig | dict, max_length: int = 256,
                run_id: str | None = None, store_root: str | None = None, device: str | None = None) -> Built:
    """The proxy artifact: trained (or resumed from its committed checkpoints) unless it is committed."""
    cfg = as_proxy_config(proxy)
    steps_at = checkpoint_steps(cfg.steps, cfg.checkpoints)

    def build(writer: ArtifactWriter) -> None:
        uri = writer.uri
        pool = load_pool(examples_uri)
        if pool.num_rows == 0:
            raise ProxyError(f"{examples_uri}: the pool (train split) is empty; nothing to train the proxy on")
        rows = example_rows(pool)
        resumed_from = 0
        for s in steps_at:
            if not is_committed(checkpoint_uri(uri, s)):
                break
            resumed_from = s
        last_loss = float("nan")
        if resumed_from != steps_at[-1]:
            resumed_from, last_loss = _train(uri, writer.key, proxy_spec, cfg, rows, max_length,
                                             resumed_from, steps_at, resolve_device(device), run_id)
        listing = [{"step": s, "uri": checkpoint_uri(uri, s)} for s in steps_at]
        writer.write_json("checkpoints.json", listing)
        writer.meta.update({
            "spec": proxy_spec, "lora": cfg.lora, "params": training_params(cfg), "max_length": max_length,
            "examples_uri": examples_uri, "n_examples": pool.num_rows, "steps": steps_at,
            "checkpoints": listing, "tokenizer_uri": join(uri, "tokenizer"),
            "resumed_from_step": resumed_from, "trained_steps": cfg.steps - resumed_from,
            "final_loss": last_loss,  # NaN (nothing trained) is written as null
        })

    params = {"proxy": model_fingerprint(proxy_spec), "training": training_params(cfg), "max_length": max_length}
    return build_once(KIND, __name__, params, build, upstream={"examples": examples_uri}, store_root=store_root,
                      resumable=True, meta=ProxyMeta)


def recipe(cfg: ProxyConfig) -> Recipe:
    return Recipe(steps=cfg.steps, learning_rate=cfg.learning_rate, batch_size=cfg.batch_size, seed=cfg.seed,
                  warmup_ratio=WARMUP_FRACTION, decay="cosine", min_lr_ratio=MIN_LR_FRACTION)


@dataclass
class ProxyCheckpoints:
    """The proxy's checkpoint layout: every checkpoint stays, as a loadable model folder (the trajectory stage
    reads each one) plus `training_state.pt` (optimizer, RNG, step)."""

    uri: str
    spec: str
    lora: bool
    resume_from: int  # the committed checkpoint the model was built from (0: a fresh model)

    def latest_step(self) -> int | None:
        return self.resume_from or None

    def save(self, step: int, model, optimizer, extra: dict) -> str:
        return save_pretrained_folder(model, checkpoint_uri(self.uri, step), "proxy_checkpoint",
                                      {"step": step, "spec": self.spec, "lora": self.lora, "loss": extra["loss"]},
                                      extra={"training_state.pt": training_state_bytes(step, optimizer, extra)})

    def load(self, step: int, model, optimizer) -> dict:
        """The weights came with the model (`load_checkpoint_model`); this restores the optimizer and RNG."""
        return restore_training_state(read_bytes(join(checkpoint_uri(self.uri, step), "training_state.pt")),
                                      optimizer)


def _train(uri: str, key: str, proxy_spec: str, cfg: ProxyConfig, rows: list[tuple[str, str, str]],
           max_length: int, resumed_from: int, steps_at: list[int], device: str, run_id: str | None
           ) -> tuple[int, float]:
    """Build (or reload) the proxy and run the shared training loop to cfg.steps. Returns (resumed_from, last loss)."""
    if resumed_from and is_committed(join(uri, "tokenizer")):
        log.info("proxy %s: resuming from committed checkpoint at step %d", key, resumed_from)
        tokenizer = load_tokenizer(uri)
        model = load_checkpoint_model(uri, checkpoint_uri(uri, resumed_from), proxy_spec, cfg.lora, trainable=True)
    else:
        resumed_from = 0
        corpus = tuple(f"{p}\n{r}" if p else r for p, r, _ in rows)
        model, tokenizer = build_fresh(proxy_spec, cfg, corpus, uri)
    disable_dropout(model)
    model.to(device)
    encoded = encode_pairs(tokenizer, rows, max_length)
    saves = set(steps_at)
    stats = train(model, tokenizer.pad_token_id, encoded, recipe(cfg),
                  checkpoints=ProxyCheckpoints(uri, proxy_spec, cfg.lora, resumed_from), save_at=saves.__contains__,
                  run_id=run_id, metric_prefix="proxy_", log=log, section="proxy")
    return resumed_from, stats.last_loss


# ---------------------------------------------------------------- readers

def proxy_info(proxy_uri: str) -> ProxyMeta:
    """The proxy manifest meta, typed: `proxy_info(uri).spec`, `.lora`, `.steps`, `.checkpoints`, ..."""
    return read_meta(proxy_uri, ProxyMeta)


def proxy_checkpoints(proxy_uri: str) -> list[tuple[int, str]]:
    return [(c.step, c.uri) for c in proxy_info(proxy_uri).checkpoints]
