"""One tokenization shared by every stage, so "loss tokens" mean the same thing everywhere.

An example is `prompt ids + response ids + eos`; the loss is on the response ids and the eos. Plain text has
an empty prompt, so every token is a loss token. Truncation cuts the response tail, never the prompt head.
A chat with several assistant turns comes with `turns` (see `core.formats.chat_segments`): every assistant turn
and its eos are loss tokens, the rest is context, and truncation cuts the tail.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np


@dataclass
class Encoded:
    input_ids: list[int]
    loss_mask: list[int]    # 1 where the token is a loss token (predicted from the tokens before it)

    @property
    def n_loss(self) -> int:
        return int(sum(self.loss_mask))


def encode_example(tokenizer, prompt: str, response: str, max_length: int | None = None, turns: str = "") -> Encoded:
    if turns:
        return encode_turns(tokenizer, turns, max_length)
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    r = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if max_length is not None and len(p) + len(r) > max_length:
        keep_prompt = min(len(p), max_length // 2)
        p = p[len(p) - keep_prompt:]  # keep the end of the prompt: it leads into the response
        r = r[: max_length - len(p)]
    mask = [0] * len(p) + [1] * len(r)
    mask[0] = 0  # the first token has nothing before it to be predicted from
    return Encoded(p + r, mask)


def encode_turns(tokenizer, turns: str, max_length: int | None = None) -> Encoded:
    ids: list[int] = []
    mask: list[int] = []
    for text, is_loss in json.loads(turns):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        if is_loss:
            piece = piece + [tokenizer.eos_token_id]
        ids += piece
        mask += [int(bool(is_loss))] * len(piece)
    if max_length is not None:
        ids, mask = ids[:max_length], mask[:max_length]
    if mask:
        mask[0] = 0
    return Encoded(ids, mask)


def encode_pairs(tokenizer, rows, max_length: int | None = None) -> list[Encoded]:
    """`encode_example` over (prompt, response) or (prompt, response, turns) rows."""
    return [encode_example(tokenizer, row[0], row[1], max_length, row[2] if len(row) > 2 else "") for row in rows]


def example_rows(table) -> list[tuple[str, str, str]]:
    """(prompt, response, turns) of every row of an examples table, the input of `encode_pairs`."""
    turns = table.column("turns").to_pylist() if "turns" in table.column_names else [""] * table.num_rows
    return list(zip(table.column("prompt").to_pylist(), table.column("response").to_pylist(), turns))


def loss_token_count(prompt_len: np.ndarray, response_len: np.ndarray, max_length: int | None = None) -> np.ndarray:
    """Loss tokens per example exactly as `encode_example` makes them (response + eos, truncated, minus an
    unpredictable first token), computed from token counts alone."""
    p = np.asarray(prompt_len, dtype=np.int64)
    r = np.asarray(response_len, dtype=np.int64) + 1
    if max_length is not None:
        over = p + r > max_length
        keep_p = np.where(over, np.minimum(p, max_length // 2), p)
        r = np.where(over, max_length - keep_p, r)
        p = keep_p
    return r - (p == 0).astype(np.int64)


def count_tokens(tokenizer, texts: list[str]) -> np.ndarray:
    if not texts:
        return np.zeros(0, dtype=np.int64)
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return np.array([len(x) for x in ids], dtype=np.int64)


def length_grouped_batches(lengths: np.ndarray, batch_tokens: int, max_batch: int = 256) -> list[np.ndarray]:
    """Indices grouped into batches of similar length so padding wastes little compute.

    Sorted by length (stable, so the grouping is deterministic) and cut when the padded size
    (batch size x longest length) would pass `batch_tokens`.
    """
    order = np.argsort(lengths, kind="stable")
    batches, current, longest = [], [], 0
    for i in order:
        n = int(lengths[i])
        if current and (max(longest, n) * (len(current) + 1) > batch_tokens or len(current) >= max_batch):
            batches.append(np.array(current))
            current, longest = [], 0
        current.append(int(i))
        longest = max(longest, n)
    if current:
        batches.append(np.array(current))
    return batches


def pad_batch(encoded: list[Encoded], pad_id: int, pad_to: int | None = None):
    """(input_ids, attention_mask, loss_mask) as torch tensors, right-padded to the longest (or `pad_to`)."""
    import torch

    width = max([len(e.input_ids) for e in encoded] + [pad_to or 0])
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(encoded), width), dtype=torch.long)
    loss = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, e in enumerate(encoded):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        attn[row, :n] = 1
        loss[row, :n] = torch.tensor(e.loss_mask)
    return ids, attn, loss
