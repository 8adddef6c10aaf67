"""The one training loop both trainers use: the S2L proxy on the whole pool and the target on a selection.

A `Recipe` fixes everything that shapes the weights: steps, batch size, learning rate and its schedule, weight
decay, gradient clipping, seed and batching. The batch of every step is a pure function of (lengths, recipe),
the learning rate a pure function of the step, and a checkpoint carries the optimizer state and the torch RNG,
so a run resumed from any committed checkpoint ends with exactly the weights of an uninterrupted one. Where a
checkpoint lives and what it holds (the proxy keeps every one as a loadable model folder, the target only the
newest trainable weights) is the caller's `CheckpointSink`.
"""
from __future__ import annotations

import io
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from sftcurate.data_contracts import UserError
from sftcurate.infra import progress, tracking
from sftcurate.core.head_loss import chunked_losses, frozen_head_loss_sum, loss_rows, packed_loss_sum
from sftcurate.core.packing import pack, packs
from sftcurate.core.tokenize import Encoded, pad_batch

Batching = Literal["length_grouped", "random", "pad_to_max"]
# On a GPU the first batch of every new shape is slow in bf16 (about 100 ms more per step on an H200 with
# SmolLM2-135M, benchmarks/bench_gpu.py): rounding widths up to a multiple of 64 leaves a few shapes. On a CPU
# padding is compute, so widths stay exact there.
GPU_PAD_MULTIPLE = 64


@dataclass(frozen=True)
class Recipe:
    steps: int
    learning_rate: float
    batch_size: int
    seed: int = 0
    warmup_ratio: float = 0.1          # linear warmup over this share of the steps (at least one step)
    decay: Literal["linear", "cosine"] = "linear"
    min_lr_ratio: float = 0.0          # the decay ends at this share of learning_rate
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    batching: Batching = "length_grouped"
    max_length: int | None = None      # pad_to_max pads every batch to this width
    megabatch: int = 16
    pad_multiple: int | None = None    # round batch widths up to a multiple of this; None: GPU_PAD_MULTIPLE on a GPU

    def lr(self, step: int) -> float:
        """Learning rate of 0-based step `step`."""
        warmup = max(1, int(round(self.warmup_ratio * self.steps))) if self.warmup_ratio > 0 else 0
        if step < warmup:
            return self.learning_rate * (step + 1) / warmup
        progress = (step - warmup) / max(1, self.steps - warmup)
        left = 1 - progress if self.decay == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
        return self.learning_rate * (self.min_lr_ratio + (1 - self.min_lr_ratio) * left)


# ---------------------------------------------------------------- data order and batches

def batch_schedule(lengths: np.ndarray, batch_size: int, steps: int, seed: int,
                   batching: Batching = "length_grouped", megabatch: int = 16) -> list[np.ndarray]:
    """The batch (example indices) of every step: a pure function of its arguments.

    Each epoch is a seeded permutation. With `length_grouped`, the permutation is cut into mega-batches of
    `megabatch * batch_size`, each sorted by length and cut into batches, and the batch order is shuffled
    again (the Hugging Face `group_by_length` recipe): batches hold similar lengths, the order stays random.
    """
    n = len(lengths)
    bs = min(batch_size, n)
    out: list[np.ndarray] = []
    epoch = 0
    while len(out) < steps:
        rng = np.random.default_rng([seed, epoch])
        perm = rng.permutation(n)
        if batching == "length_grouped":
            batches = []
            chunk = megabatch * bs
            for start in range(0, n, chunk):
                mb = perm[start:start + chunk]
                mb = mb[np.argsort(-lengths[mb], kind="stable")]
                batches.extend(mb[i:i + bs] for i in range(0, len(mb), bs))
            order = rng.permutation(len(batches))
            batches = [batches[i] for i in order]
        else:
            batches = [perm[i:i + bs] for i in range(0, n, bs)]
        out.extend(batches)
        epoch += 1
    return out[:steps]


def steps_for_tokens(loss_tokens: np.ndarray, lengths: np.ndarray, batch_size: int, seed: int, train_tokens: int,
                     batching: Batching = "length_grouped", megabatch: int = 16) -> int:
    """The number of steps whose batches (`batch_schedule` of the same arguments) hold the closest number of loss
    tokens to `train_tokens` (at least one step): every selection trained this way sees the same token compute,
    to within half a batch."""
    loss_tokens = np.asarray(loss_tokens, dtype=np.int64)
    per_epoch = int(loss_tokens.sum())
    if per_epoch <= 0:
        raise UserError("finetune.train_tokens: the selection has no loss tokens to train on")
    batches_per_epoch = -(-len(loss_tokens) // max(1, min(batch_size, len(loss_tokens))))
    steps = batches_per_epoch * (-(-int(train_tokens) // per_epoch) + 1)  # whole epochs, one more than needed
    seen = np.cumsum([int(loss_tokens[b].sum()) for b in batch_schedule(lengths, batch_size, steps, seed, batching,
                                                                         megabatch)])
    return int(np.argmin(np.abs(seen - train_tokens)) + 1)


def collate(encoded: list[Encoded], pad_id: int, pad_to: int | None = None):
    """(input_ids, attention_mask, labels) right-padded; labels are -100 except on loss tokens."""
    ids, attn, loss_mask = pad_batch(encoded, pad_id, pad_to)
    return ids, attn, ids.masked_fill(loss_mask == 0, -100)


def padded_width(encoded: list[Encoded], multiple: int, cap: int | None) -> int:
    """The batch's longest length rounded up to `multiple` (at most `cap`, never below the longest)."""
    longest = max(len(e.input_ids) for e in encoded)
    rounded = -(-longest // multiple) * multiple
    return max(longest, min(rounded, cap)) if cap else rounded


def batch_width(batch: list[Encoded], recipe: Recipe, on_gpu: bool) -> int | None:
    """The width a training batch is padded to: `max_length` for pad_to_max; else its longest example, rounded up
    to `recipe.pad_multiple` (default GPU_PAD_MULTIPLE on a GPU, exact on a CPU); None means the longest."""
    if recipe.batching == "pad_to_max":
        return recipe.max_length
    multiple = recipe.pad_multiple or (GPU_PAD_MULTIPLE if on_gpu else 1)
    return padded_width(batch, multiple, recipe.max_length) if multiple > 1 else None


def token_loss_sum(model, ids, attn, labels):
    """(sum of token losses, number of loss tokens) of a batch: the token-weighted loss every stage uses.

    Where `head_loss.split_head` applies, the output projection runs on the loss positions only, a chunk at a
    time (`head_loss.frozen_head_loss_sum`): a batch's vocabulary logits never exist whole. Else the model's own
    logits."""
    rows = loss_rows(model, ids, attn, labels)
    if rows is not None:
        head, hidden, goal, sel = rows
        return frozen_head_loss_sum(hidden, head, goal), int(sel.sum())
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
    target = labels[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), target.reshape(-1), ignore_index=-100,
                           reduction="sum")
    return loss, int((target != -100).sum())


def row_loss_sums(model, ids, attn, labels):
    """(sum of token losses, number of loss tokens) of every row of a batch: per-example held-out losses.

    Where `head_loss.split_head` applies, the vocabulary projection runs on the loss positions only,
    `head_loss.LOSS_ROWS_PER_CHUNK` rows at a time: a batch's full logits in float32 ([64, 127, 49,152] for
    SmolLM2 at 8,192 tokens: 1.6 GB, and as much again for the softmax) never exist. Else the model's own
    logits, as before."""
    rows = loss_rows(model, ids, attn, labels)
    if rows is None:
        target = labels[:, 1:]
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
        loss = F.cross_entropy(logits.transpose(1, 2).float(), target, ignore_index=-100, reduction="none")
        return loss.sum(dim=1), (target != -100).sum(dim=1)
    head, hidden, goal, sel = rows
    losses = chunked_losses(head, hidden, goal)
    sums = torch.zeros(ids.shape[0], dtype=losses.dtype, device=losses.device)
    return sums.index_add_(0, sel.nonzero()[:, 0], losses), sel.sum(dim=1)


# ---------------------------------------------------------------- the loop

class CheckpointSink(Protocol):
    def latest_step(self) -> int | None: ...

    def save(self, step: int, model, optimizer, extra: dict) -> str: ...

    def load(self, step: int, model, optimizer) -> dict: ...


@dataclass
class TrainStats:
    steps: int = 0
    tokens_seen: int = 0           # loss tokens
    real_tokens: int = 0           # non-pad input tokens
    padded_tokens: int = 0         # input tokens including padding
    seconds: float = 0.0
    resumed_from: int | None = None
    losses: list = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.real_tokens / self.seconds if self.seconds else 0.0

    @property
    def padding_fraction(self) -> float:
        return 1 - self.real_tokens / self.padded_tokens if self.padded_tokens else 0.0

    @property
    def last_loss(self) -> float:
        return self.losses[-1] if self.losses else float("nan")


def batch_loss(model, batch: list[Encoded], pad_id: int, recipe: Recipe, device, packed: bool):
    """(mean loss over the batch's loss tokens, a tensor; loss tokens; real tokens; padded tokens).

    Packed (a GPU in half precision, `core.packing`): one row, no padding, the loss over the loss rows as
    `token_loss_sum` computes it (`head_loss.packed_loss_sum`), and every count from the host's lengths, so the
    step never waits for the device. Else the padded batch `batch_width` says, as on a CPU."""
    if packed:
        pb = pack(batch, device)
        n_tok = int(pb.loss_targets.shape[0])
        return packed_loss_sum(model, pb) / max(n_tok, 1), n_tok, pb.tokens, pb.tokens
    width = batch_width(batch, recipe, on_gpu=device.type == "cuda")
    ids, attn, labels = (t.to(device) for t in collate(batch, pad_id, width))
    loss_sum, n_tok = token_loss_sum(model, ids, attn, labels)
    return loss_sum / max(n_tok, 1), n_tok, int(attn.sum()), int(attn.numel())


def optimizer_step(optimizer, params: list, loss, lr: float, max_grad_norm: float) -> None:
    """One AdamW step at `lr` on `loss`, gradients clipped to `max_grad_norm` (no read-back: the caller reads
    the loss when it needs the number)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()


def make_optimizer(params: list, recipe: Recipe, device):
    """AdamW; on a GPU the fused kernel (one launch for every parameter instead of several per tensor)."""
    fused = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(params, lr=recipe.learning_rate, weight_decay=recipe.weight_decay, **fused)


def train(model, pad_id: int, encoded: list[Encoded], recipe: Recipe, *, checkpoints: CheckpointSink | None = None,
          save_at: Callable[[int], bool] = lambda step: False, run_id: str | None = None, metric_prefix: str = "",
          log=None, section: str = "training") -> TrainStats:
    """Train `model` (already on its device, trainable parameters set) in place to `recipe.steps`.

    Resumes from `checkpoints.latest_step()` when there is one; commits a checkpoint after every (1-based)
    step where `save_at(step)`. The caller's global torch RNG is left as it was. Every step is reported to
    `infra.progress` as a "step" event of `section` (step, steps, loss).
    `section` names the config section in errors (a diverging loss is the recipe's fault, so it is not retried).
    A step's loss is read back while the next step is already queued (one step late), so a GPU never idles
    waiting for the host; checkpoints and the last step read it at once.
    """
    device = next(model.parameters()).device
    devices = [device.index or 0] if device.type == "cuda" else []
    lengths = np.array([len(e.input_ids) for e in encoded], dtype=np.int64)
    schedule = batch_schedule(lengths, recipe.batch_size, recipe.steps, recipe.seed, recipe.batching,
                              recipe.megabatch)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, recipe, device)
    packed = packs(model)
    stats = TrainStats()
    log_every = max(1, recipe.steps // 100)
    window: list[float] = []

    def settle(step: int, loss, lr: float) -> float:
        """Read a finished step's loss and do what needs the number (progress, the metric window)."""
        value = float(loss)
        if not math.isfinite(value):
            raise UserError(f"{section}: the training loss became {value} at step {step + 1}; lower "
                            f"{section}.learning_rate")
        done = step + 1
        stats.losses.append(value)
        window.append(value)
        progress.step(section, done, recipe.steps, value)
        if run_id and (done % log_every == 0 or done == recipe.steps):
            tracking.log_metrics(run_id, {f"{metric_prefix}loss": float(np.mean(window)), f"{metric_prefix}lr": lr,
                                          f"{metric_prefix}tokens_seen": stats.tokens_seen}, step=done)
            window.clear()
        return value

    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(recipe.seed)
        start = checkpoints.latest_step() if checkpoints is not None else None
        if start:
            extra = checkpoints.load(start, model, optimizer)  # also restores the RNG state
            stats.resumed_from = start
            stats.tokens_seen = int(extra.get("tokens_seen", 0))
            if log:
                log.info("resumed from the checkpoint at step %d of %d", start, recipe.steps)
        model.train()
        t0 = time.perf_counter()
        pending = None
        for step in range(start or 0, recipe.steps):
            lr = recipe.lr(step)
            loss, n_tok, real, padded = batch_loss(model, [encoded[i] for i in schedule[step]], pad_id, recipe,
                                                   device, packed)
            optimizer_step(optimizer, params, loss, lr, recipe.max_grad_norm)
            if pending is not None:
                settle(*pending)
            pending = (step, loss.detach(), lr)
            done = step + 1
            stats.steps = done
            stats.tokens_seen += n_tok
            stats.real_tokens += real
            stats.padded_tokens += padded
            if checkpoints is not None and save_at(done):
                value, pending = settle(*pending), None
                checkpoints.save(done, model, optimizer, {"tokens_seen": stats.tokens_seen, "loss": value})
                if run_id:
                    tracking.log_metrics(run_id, {f"{metric_prefix}checkpoint_loss": value}, step=done)
        if pending is not None:
            settle(*pending)
        stats.seconds = time.perf_counter() - t0
    model.eval()
    return stats


def training_state_bytes(step: int, optimizer, extra: dict) -> bytes:
    """What a checkpoint needs beyond the weights to resume bit-exactly: the optimizer state, the torch RNG
    state (CPU, and every CUDA device when there is one), the step and the caller's `extra`."""
    state = {"step": step, "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None, "extra": extra}
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def restore_training_state(data: bytes, optimizer) -> dict:
    """Load `training_state_bytes` back into `optimizer` and torch's RNG; returns the `extra` it was saved with."""
    state = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state["extra"]
