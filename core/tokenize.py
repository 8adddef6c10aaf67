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
import weakref
from dataclasses import dataclass

import numpy as np

# A text longer than `text_bound` characters is never tokenized whole when only its first (or last) tokens are
# needed: a 20 MB record took GBs in the tokenizer. Its prefix is tokenized instead, and again a prefix twice as
# long; the first tokens are used once both agree (cutting a text changes only the tokens next to the cut).
BOUND_MARGIN_TOKENS = 16
_LONGEST: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


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
    if max_length is None:
        p = _ids(tokenizer, prompt)
        r = _ids(tokenizer, response) + [tokenizer.eos_token_id]
    else:  # a piece longer than max_length is cut below, so only its first (a prompt: last) tokens are read
        p = tail_ids(tokenizer, prompt, max_length + 1) if prompt else []
        r = head_ids(tokenizer, response, max_length + 1) + [tokenizer.eos_token_id]
    if max_length is not None and len(p) + len(r) > max_length:
        keep_prompt = min(len(p), max_length // 2)
        p = p[len(p) - keep_prompt:]  # keep the end of the prompt: it leads into the response
        r = r[: max_length - len(p)]
    mask = [0] * len(p) + [1] * len(r)
    mask[0] = 0  # the first token has nothing before it to be predicted from
    return Encoded(p + r, mask)


def encode_head(tokenizer, prompt: str, response: str, n: int, turns: str = "") -> Encoded:
    """The first `n` tokens of `encode_example` without a max_length (the whole example, cut at its end, not at a
    prompt's head): whether an example fits, and its counts when it does, from no more text than that."""
    if turns:
        return encode_example(tokenizer, prompt, response, n, turns)  # a rendering's max_length cuts its tail
    p = head_ids(tokenizer, prompt, n) if prompt else []
    r = head_ids(tokenizer, response, n - len(p)) + [tokenizer.eos_token_id] if len(p) < n else []
    mask = ([0] * len(p) + [1] * len(r))[:n]
    mask[0] = 0
    return Encoded((p + r)[:n], mask)


def encode_turns(tokenizer, turns: str, max_length: int | None = None) -> Encoded:
    """A chat's turns ([[text, is_loss], ...]) with an eos after every loss turn."""
    return encode_rendered(tokenizer, {"segments": json.loads(turns), "eos": True}, max_length)


def encode_rendered(tokenizer, rendered: dict, max_length: int | None = None) -> Encoded:
    """A rendered example (`{"segments": [[text, is_loss], ...], "eos": bool}`) as ids and loss mask."""
    segments, eos = rendered["segments"], bool(rendered["eos"])
    if not eos and getattr(tokenizer, "is_fast", False):
        ids, mask = _encode_whole(tokenizer, segments, max_length)
    else:
        ids, mask = [], []
        for text, is_loss in segments:
            if max_length is not None and len(ids) > max_length:
                break  # cut below: later segments are never read
            if max_length is None:
                piece = _ids(tokenizer, text)
            else:
                piece = head_ids(tokenizer, text, max_length + 1 - len(ids)) if text else []
            if is_loss and eos:
                piece = piece + [tokenizer.eos_token_id]
            ids += piece
            mask += [int(bool(is_loss))] * len(piece)
    if max_length is not None:
        ids, mask = ids[:max_length], mask[:max_length]
    if mask:
        mask[0] = 0
    return Encoded(ids, mask)


def _encode_whole(tokenizer, segments: list, max_length: int | None = None) -> tuple[list[int], list[int]]:
    """The concatenated text tokenized once (token boundaries exactly as a trainer tokenizing the rendered chat
    gets them); a token is a loss token when its first character lies in a loss segment. With `max_length`, only
    the first max_length + 1 tokens (`head_ids`)."""
    spans, at = [], 0
    for text, is_loss in segments:
        if is_loss:
            spans.append((at, at + len(text)))
        at += len(text)
    text = "".join(text for text, _ in segments)
    ids, offsets = _tokens(tokenizer, text, True) if max_length is None else \
        head_ids(tokenizer, text, max_length + 1, offsets=True)
    starts = np.array([start for start, _ in offsets], dtype=np.int64)
    in_loss = np.zeros(len(starts), dtype=bool)
    for lo, hi in spans:
        in_loss |= (starts >= lo) & (starts < hi)
    return list(ids), in_loss.astype(int).tolist()


# ---------------------------------------------------------------- the first (last) tokens of a long text

def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def _tokens(tokenizer, text: str, offsets: bool) -> tuple[list[int], list | None]:
    if not offsets:
        return _ids(tokenizer, text), None
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]


def longest_token(tokenizer) -> int:
    """Characters of the vocabulary's longest token (its stored form: a byte-level token's bytes), so no token
    covers more characters of a text."""
    try:
        return _LONGEST[tokenizer]
    except (KeyError, TypeError):
        pass
    longest = max((len(t) for t in tokenizer.get_vocab()), default=1)
    try:
        _LONGEST[tokenizer] = longest
    except TypeError:  # a tokenizer that takes no weak reference: computed each time
        pass
    return longest


def text_bound(tokenizer, n_tokens: int) -> int:
    """Characters that hold a text's first `n_tokens` tokens with room to spare: a token covers at most
    `longest_token` characters (twice that where a normalizer joins characters), plus a margin of tokens."""
    return 2 * (n_tokens + BOUND_MARGIN_TOKENS) * longest_token(tokenizer)


def head_ids(tokenizer, text: str, n: int, offsets: bool = False):
    """The first `n` token ids of `text` (with `offsets`: and their character offsets), those of tokenizing it
    whole. A text longer than `text_bound` is not tokenized whole: a prefix is, and a prefix twice as long, and
    their first n tokens are taken once they agree (else the bound doubles)."""
    bound = text_bound(tokenizer, n)
    while len(text) > bound:
        first, second = _tokens(tokenizer, text[:bound], offsets), _tokens(tokenizer, text[:2 * bound], offsets)
        if len(first[0]) > n and first[0][:n] == second[0][:n] and (not offsets or first[1][:n] == second[1][:n]):
            return (first[0][:n], first[1][:n]) if offsets else first[0][:n]
        bound *= 2
    ids, where = _tokens(tokenizer, text, offsets)
    return (ids[:n], where[:n]) if offsets else ids[:n]


def tail_ids(tokenizer, text: str, n: int) -> list[int]:
    """The last `n` token ids of `text` (fewer when it has fewer), by suffixes as `head_ids` reads prefixes."""
    bound = text_bound(tokenizer, n)
    while len(text) > bound:
        first, second = _ids(tokenizer, text[-bound:]), _ids(tokenizer, text[-2 * bound:])
        if len(first) > n and first[-n:] == second[-n:]:
            return first[-n:]
        bound *= 2
    return _ids(tokenizer, text)[-n:]


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
    import torch  # deferred on purpose: torch (seconds): tokenizing for the store needs none

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
