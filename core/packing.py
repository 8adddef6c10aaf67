"""Packed forward passes: a batch's sequences laid end to end in one row, each attending only to itself.

Right padding costs a GPU the padded positions' compute; packing costs none. The sequences of a batch are
concatenated into one row with per-sequence positions (0..n-1 each, so rotary or learned position embeddings see
what they would see alone), and attention is variable-length: `torch.nn.attention.varlen.varlen_attn` (the flash
kernel over cumulative sequence offsets) on a CUDA device in bf16/fp16, else scaled-dot-product attention with a
block-diagonal causal mask (the reference the CPU tests compare against the padded path, in float32).

The attention function is registered with transformers under `PACKED_ATTENTION` and selected only inside
`packed_mode(model)`; the offsets travel to every layer as the keyword arguments flash-attention kernels use
(`cu_seq_lens_q`, `max_length_q`, ...), which transformers passes through the decoder layers unchanged. Its mask
function builds no mask: the attention function masks itself.

Only the rows a caller needs leave the model's body: the hidden state at position t-1 of every loss token t
(`PackedBatch.loss_rows`), so features, per-token losses and the training loss never touch the others (the
losses over those rows: `core.head_loss`).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from sftcurate.core.tokenize import Encoded

log = logging.getLogger("sftcurate.packing")

PACKED_ATTENTION = "sftcurate_packed"
# Architectures whose logits are exactly `get_output_embeddings()(last_hidden_state)` (no scaling or capping):
# for these the vocabulary projection can run at loss positions only, and their attention layers go through
# transformers' attention interface, so packing applies to them.
LOGITS_FROM_HIDDEN = {"gpt2", "llama", "mistral", "qwen2", "qwen3", "gpt_neox", "phi3", "smollm3", "olmo2"}
# A GPU's token batch: big enough that each layer's matrix products fill the device (the CPU's 4,096 leave an
# H200 launch-bound); a packed batch of 65,536 tokens holds about 1 GB of a 1-2B model's widest activation.
DEVICE_BATCH_TOKENS = 1 << 16


@dataclass
class PackedBatch:
    ids: torch.Tensor            # [1, T] every sequence's tokens, end to end
    positions: torch.Tensor      # [1, T] 0..n_i-1 within each sequence
    cu_seqlens: torch.Tensor     # int32 [n+1] sequence offsets into the row
    max_len: int
    loss_rows: torch.Tensor      # [M] row positions t-1 whose hidden state predicts a loss token t
    loss_targets: torch.Tensor   # [M] those loss tokens
    loss_example: torch.Tensor   # [M] which sequence of the batch each loss row belongs to
    n: int                       # sequences
    tokens: int                  # T

    def attention_kwargs(self) -> dict:
        return {"cu_seq_lens_q": self.cu_seqlens, "cu_seq_lens_k": self.cu_seqlens,
                "max_length_q": self.max_len, "max_length_k": self.max_len}


def pack(batch: list[Encoded], device) -> PackedBatch:
    """One packed row of `batch` (host-side numpy, then one copy each to `device`)."""
    lengths = np.array([len(e.input_ids) for e in batch], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    total = int(starts[-1])
    ids = np.fromiter((t for e in batch for t in e.input_ids), dtype=np.int64, count=total)
    loss = np.fromiter((m for e in batch for m in e.loss_mask), dtype=bool, count=total)
    positions = np.arange(total, dtype=np.int64) - np.repeat(starts[:-1], lengths)
    example = np.repeat(np.arange(len(batch), dtype=np.int64), lengths)
    targets = np.flatnonzero(loss & (positions > 0))     # a sequence's first token is never predicted
    to = dict(device=device, non_blocking=True)
    return PackedBatch(
        ids=torch.from_numpy(ids)[None].to(**to), positions=torch.from_numpy(positions)[None].to(**to),
        cu_seqlens=torch.from_numpy(starts.astype(np.int32)).to(**to), max_len=int(lengths.max(initial=1)),
        loss_rows=torch.from_numpy(targets - 1).to(**to), loss_targets=torch.from_numpy(ids[targets]).to(**to),
        loss_example=torch.from_numpy(example[targets]).to(**to), n=len(batch), tokens=total)


def packed_batches(lengths: np.ndarray, batch_tokens: int) -> list[np.ndarray]:
    """Consecutive runs of the examples sorted by length (longest first), each at most `batch_tokens` tokens
    (a longer example alone): with packing, a batch's cost is its tokens, not its widest row times its rows."""
    order = np.argsort(-lengths, kind="stable")
    batches, start, used = [], 0, 0
    for pos, i in enumerate(order):
        if pos > start and used + lengths[i] > batch_tokens:
            batches.append(order[start:pos])
            start, used = pos, 0
        used += int(lengths[i])
    if start < len(order):
        batches.append(order[start:])
    return batches


# ---------------------------------------------------------------- attention

def _varlen():
    try:
        # deferred on purpose: optional: varlen_attn exists only in newer torch releases
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def varlen_ready(device: torch.device, dtype: torch.dtype) -> bool:
    """The flash variable-length kernel applies: CUDA, half precision, a torch that ships it, and a first call
    on this device that agreed with the masked reference (torch's signature has moved between releases; a
    kernel that fails or disagrees leaves the padded path in place, with one warning)."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16) or _varlen() is None:
        return False
    key = (str(device), dtype)
    if key not in _CHECKED:
        _CHECKED[key] = _kernel_agrees(device, dtype)
    return _CHECKED[key]


_CHECKED: dict = {}


def _kernel_agrees(device: torch.device, dtype: torch.dtype) -> bool:
    """Three sequences, grouped-query heads: the flash kernel against `_masked_sdpa` in float32."""
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, 4, 40, 64, device=device, generator=g)
    k, v = (torch.randn(1, 2, 40, 64, device=device, generator=g) for _ in range(2))
    cu = torch.tensor([0, 7, 30, 40], dtype=torch.int32, device=device)
    try:
        got = _flash_varlen(*(t.to(dtype)[0].transpose(0, 1) for t in (q, k, v)), cu, 23, 0.125).float()
    except Exception as exc:  # noqa: BLE001  (any failure means: do not use the kernel)
        log.warning("packed attention off on %s: the variable-length kernel failed (%s)", device, exc)
        return False
    ref = _masked_sdpa(q, k, v, cu, 0.125)[0]
    err = float((got - ref).norm() / ref.norm())
    if not err < 2e-2:
        log.warning("packed attention off on %s: the variable-length kernel differs from the reference by %.1e",
                    device, err)
    return err < 2e-2


def packs(model) -> bool:
    """Packed passes apply to `model`: the flash variable-length kernel runs on its device and dtype, and its
    architecture's logits come from the last hidden state alone."""
    p = next(model.parameters())
    return (varlen_ready(p.device, p.dtype)
            and getattr(causal_lm(model).config, "model_type", None) in LOGITS_FROM_HIDDEN)


def _flash_varlen(q, k, v, cu, max_len, scale):
    """q [T, H, D], k/v [T, Hkv, D] -> [T, H, D], causal within each sequence. torch's signature moved between
    releases (is_causal -> window_size; enable_gqa added), so the call follows the installed one."""
    fn = _varlen()
    params = inspect.signature(fn).parameters
    kwargs = {"scale": scale} if "scale" in params else {}   # without it: 1/sqrt(D), what Llama-type models use
    if "window_size" in params:
        kwargs["window_size"] = (-1, 0)
    else:
        kwargs["is_causal"] = True
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return fn(q, k, v, cu, cu, max_len, max_len, **kwargs)


def _masked_sdpa(query, key, value, cu, scale):
    """The reference: one [T, T] block-diagonal causal mask. query [1, H, T, D], key/value [1, Hkv, T, D]."""
    T = query.shape[2]
    seq = torch.searchsorted(cu[1:].long(), torch.arange(T, device=query.device), right=True)
    ar = torch.arange(T, device=query.device)
    mask = (seq[:, None] == seq[None, :]) & (ar[:, None] >= ar[None, :])
    if key.shape[1] != query.shape[1]:
        rep = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)
    return out.transpose(1, 2)


def packed_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention interface: query [1, H, T, D], key/value [1, Hkv, T, D] -> ([1, T, H, D], None)."""
    cu, max_len = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if cu is None:
        raise RuntimeError(f"{PACKED_ATTENTION} attention needs cu_seq_lens_q: call the model through core.packing")
    if varlen_ready(query.device, query.dtype):
        out = _flash_varlen(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), cu,
                            int(max_len), scaling)
        return out[None], None
    return _masked_sdpa(query, key, value, cu, scaling), None


def _no_mask(*args, **kwargs):
    return None


@functools.cache
def _register() -> None:
    """The attention function, and a mask function that builds nothing (the attention masks itself): with it,
    transformers releases that would otherwise build a default mask for an unknown name build none either. Once,
    on first use: importing transformers' modeling code takes ~3 s, which every CLI command paid at import
    (`sftcurate select` imports this module through the embedding code)."""
    # deferred on purpose: transformers (seconds), registered on first packed use
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_attention)
    AttentionMaskInterface.register(PACKED_ATTENTION, _no_mask)


def causal_lm(model):
    """The transformers causal LM inside `model` (itself, or the model a peft wrapper holds)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextlib.contextmanager
def packed_mode(model):
    """Inside: every attention layer of `model` runs `packed_attention`."""
    _register()
    lm = causal_lm(model)
    configs = [m.config for m in lm.modules() if getattr(m, "config", None) is not None]
    before = [c._attn_implementation for c in configs]
    for c in configs:
        c._attn_implementation = PACKED_ATTENTION
    try:
        yield lm
    finally:
        for c, b in zip(configs, before):
            c._attn_implementation = b


def packed_hidden(model, batch: PackedBatch) -> torch.Tensor:
    """Final hidden states (after the final norm) at `batch.loss_rows`: [M, d]."""
    with packed_mode(model) as lm:
        body = getattr(lm, lm.base_model_prefix)
        h = body(input_ids=batch.ids, position_ids=batch.positions, **batch.attention_kwargs()).last_hidden_state
    return h[0, batch.loss_rows]

