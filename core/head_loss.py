"""The training loss without a batch's vocabulary logits: the output projection on the loss rows only, a chunk
at a time, its gradient taken in the same pass.

A LoRA fine-tune freezes the output embedding, so the only gradient the loss sends back is the one to the last
hidden state: (softmax - onehot) W per loss row. Autograd would keep the logits, their log-softmax and its
gradient alive at once (at SmolLM2's 49,152 tokens and batch 8 x 127 positions that is 200 MB each, and the
slice before the loss copies them once more); here one chunk's logits exist at a time, and the backward pass
only scales the saved [rows, hidden] gradient. Where the head trains too (a full fine-tune) or has a bias, the
plain autograd path runs instead.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sftcurate.core.packing import LOGITS_FROM_HIDDEN, PackedBatch, causal_lm, packed_hidden

# Loss rows whose vocabulary logits exist at once: 1,024 x 49,152 float32 is 200 MB (the held-out loss);
# training keeps the softmax too, so it takes a quarter of that.
LOSS_ROWS_PER_CHUNK = 1024
TRAIN_ROWS_PER_CHUNK = 256


def split_head(model):
    """(output embedding, body) where the architecture's logits are the output embedding of the body's last hidden
    state (`LOGITS_FROM_HIDDEN`), else None."""
    lm = causal_lm(model)
    head, body = lm.get_output_embeddings(), getattr(lm, getattr(lm, "base_model_prefix", ""), None)
    if head is None or body is None or getattr(lm.config, "model_type", None) not in LOGITS_FROM_HIDDEN:
        return None
    return head, body


def loss_rows(model, ids, attn, labels):
    """(output embedding, hidden states of the loss positions [M, d], their targets [M], the mask [B, T-1]), or
    None where `split_head` does not apply."""
    split = split_head(model)
    if split is None:
        return None
    head, body = split
    target = labels[:, 1:]
    sel = target != -100
    hidden = body(input_ids=ids, attention_mask=attn).last_hidden_state[:, :-1][sel]
    return head, hidden, target[sel], sel


def chunked_losses(head, hidden, targets, chunk: int | None = None):
    """Cross-entropy (float32) of every loss row, [M], the vocabulary projection `chunk` rows at a time (default
    LOSS_ROWS_PER_CHUNK). Under autograd every chunk's logits are kept for the backward pass."""
    chunk = chunk or LOSS_ROWS_PER_CHUNK
    return torch.cat([F.cross_entropy(head(hidden[i:i + chunk]).float(), targets[i:i + chunk], reduction="none")
                      for i in range(0, len(targets), chunk)] or [hidden.new_zeros(0, dtype=torch.float32)])


class _FrozenHeadCrossEntropy(torch.autograd.Function):
    """Sum of cross-entropies of `hidden @ weight.T` against `targets`; the gradient to `hidden` only."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk):
        total = hidden.new_zeros((), dtype=torch.float32)
        grad = torch.empty_like(hidden)
        for i in range(0, hidden.shape[0], chunk):
            logits = (hidden[i:i + chunk] @ weight.T).float()
            goal = targets[i:i + chunk]
            rows = torch.arange(len(goal), device=logits.device)
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits[rows, goal]).sum()
            probs = logits.sub_(lse[:, None]).exp_()     # in place: one chunk of [rows, vocabulary] at a time
            probs[rows, goal] -= 1
            grad[i:i + chunk] = (probs.to(weight.dtype) @ weight).to(hidden.dtype)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None


def frozen_head_loss_sum(hidden, head, targets):
    """Sum of the loss rows' cross-entropies (float32), differentiable in `hidden`: the fused chunked pass when
    the head is frozen and has no bias and a gradient is wanted, else autograd over the rows' logits, a chunk at a
    time (without a gradient only one chunk's logits exist at once; with one, autograd keeps them all)."""
    if head.weight.requires_grad or getattr(head, "bias", None) is not None or not hidden.requires_grad:
        return chunked_losses(head, hidden, targets, TRAIN_ROWS_PER_CHUNK).sum()
    return _FrozenHeadCrossEntropy.apply(hidden, head.weight, targets, TRAIN_ROWS_PER_CHUNK)


def packed_token_losses(model, batch: PackedBatch) -> torch.Tensor:
    """Cross-entropy (float32) of every loss token of a packed batch, in row order: [M], a chunk of rows'
    logits at a time (the per-example losses, without a gradient)."""
    return chunked_losses(causal_lm(model).get_output_embeddings(), packed_hidden(model, batch), batch.loss_targets)


def packed_loss_sum(model, batch: PackedBatch) -> torch.Tensor:
    """Sum of a packed batch's loss-token cross-entropies (float32), for training: `frozen_head_loss_sum` over the
    loss rows' hidden states, so a LoRA step on a GPU never holds the batch's vocabulary logits either."""
    return frozen_head_loss_sum(packed_hidden(model, batch), causal_lm(model).get_output_embeddings(),
                                batch.loss_targets)
