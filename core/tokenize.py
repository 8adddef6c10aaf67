"""One tokenization shared by every stage, so "loss tokens" mean the same thing everywhere.

An example's `turns` column says which text it trains on (`core.training_text` writes it at ingest):
- "" (the plain template): `prompt ids + response ids + eos`; the loss is on the response ids and the eos. Plain
  text has an empty prompt, so every token is a loss token. Truncation cuts the response tail, never the prompt
  head.
- a JSON list `[[text, is_loss], ...]` (the plain template on a chat with several assistant turns, see
  `core.formats.chat_segments`): every assistant turn and its eos are loss tokens, the rest is context, and
  truncation cuts the tail.
- a JSON object `{"segments": [[text, is_loss], ...], "eos": bool}` (a chat template or a format string): the
  rendered text, whose loss segments (each followed by the tokenizer's eos when `eos`) carry the loss. Without
  `eos` (a chat template writes its own end-of-turn marker) and with a fast tokenizer the text is tokenized
  whole, as `apply_chat_template(tokenize=True)` and TRL do, and a token is a loss token when it starts inside
  a loss segment. Truncation cuts the tail.
Token budgets are `Encoded.n_loss` of this very encoding (counted at ingest by `core.training_text`): no second
counting rule exists to drift from it.
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
    if turns.startswith("{"):
        return encode_rendered(tokenizer, json.loads(turns), max_length)
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
    """A chat's turns ([[text, is_loss], ...]) with an eos after every loss turn."""
    return encode_rendered(tokenizer, {"segments": json.loads(turns), "eos": True}, max_length)


def encode_rendered(tokenizer, rendered: dict, max_length: int | None = None) -> Encoded:
    """A rendered example (`{"segments": [[text, is_loss], ...], "eos": bool}`) as ids and loss mask."""
    segments, eos = rendered["segments"], bool(rendered["eos"])
    if not eos and getattr(tokenizer, "is_fast", False):
        ids, mask = _encode_whole(tokenizer, segments)
    else:
        ids, mask = [], []
        for text, is_loss in segments:
            piece = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
            if is_loss and eos:
                piece = piece + [tokenizer.eos_token_id]
            ids += piece
            mask += [int(bool(is_loss))] * len(piece)
    if max_length is not None:
        ids, mask = ids[:max_length], mask[:max_length]
    if mask:
        mask[0] = 0
    return Encoded(ids, mask)


def _encode_whole(tokenizer, segments: list) -> tuple[list[int], list[int]]:
    """The concatenated text tokenized once (token boundaries exactly as a trainer tokenizing the rendered chat
    gets them); a token is a loss token when its first character lies in a loss segment."""
    spans, at = [], 0
    for text, is_loss in segments:
        if is_loss:
            spans.append((at, at + len(text)))
        at += len(text)
    encoded = tokenizer("".join(text for text, _ in segments), add_special_tokens=False,
                        return_offsets_mapping=True)
    starts = np.array([start for start, _ in encoded["offset_mapping"]], dtype=np.int64)
    in_loss = np.zeros(len(starts), dtype=bool)
    for lo, hi in spans:
        in_loss |= (starts >= lo) & (starts < hi)
    return list(encoded["input_ids"]), in_loss.astype(int).tolist()


def encode_pairs(tokenizer, rows, max_length: int | None = None) -> list[Encoded]:
    """`encode_example` over (prompt, response) or (prompt, response, turns) rows."""
    return [encode_example(tokenizer, row[0], row[1], max_length, row[2] if len(row) > 2 else "") for row in rows]


def example_rows(table) -> list[tuple[str, str, str]]:
    """(prompt, response, turns) of every row of an examples table, the input of `encode_pairs`."""
    turns = table.column("turns").to_pylist() if "turns" in table.column_names else [""] * table.num_rows
    return list(zip(table.column("prompt").to_pylist(), table.column("response").to_pylist(), turns))


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
