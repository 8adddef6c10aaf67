"""The one text an example trains on: the target's chat template (or a configured format) applied at ingest, and
the `source.too_long` rule for examples longer than `max_length`.

Ingest renders every example once (`fit_examples`) and stores the result in its `turns` column; every later
stage (token features, the S2L proxy and its trajectories, budgets, fine-tuning, held-out loss) tokenizes that
column through `core.tokenize.encode_example`, so they all see the same text and the same loss tokens.

Templates (`models.template`):
- `chat`: the tokenizer's chat template over the record as chat messages (the same messages `sftcurate export
  --format messages` writes; a record without a prompt is one assistant turn), as TRL's SFTTrainer renders
  `messages`; the loss is on each assistant turn's content and its end-of-turn marker.
- `plain`: prompt tokens, response tokens, eos (no markup; a chat's turns as "User: ..." lines).
- a format string holding `{prompt}` and `{response}` once each, e.g.
  "### Question:\\n{prompt}\\n### Answer:\\n{response}": each assistant turn rendered with the turns before it
  as `{prompt}`; the loss is on the response, the text after `{response}`, and an eos.
- `auto` (the default): `chat` when the tokenizer has a chat template, else `plain`.

`source.too_long` (a pool example whose whole rendering is longer than `max_length` tokens), counted either way
(held-out examples are evaluation data, never selected nor exported: they stay whole, see `fit_examples`):
- `cut` (the default): the first assistant turn that does not fit is cut at a token boundary so the rendering
  fits, later turns are removed, and the examples table's `raw` holds the cut record, so what the selector
  scores, what a token budget counts, what the fine-tune trains on and what the export writes are one text.
  A record whose context alone leaves no room for a response token is dropped.
- `drop`: left out of the pool and the held-out split.
- `keep`: the record stays whole: its budget counts every loss token of the whole rendering (what a trainer
  without a length limit trains on), while token features, trajectories and this project's own fine-tune see
  its first `max_length` tokens (FisherSFT's token budget costs a record by its feature rows: with token budgets
  use `cut` or `drop`).
Why `cut` by default: `max_length` caps the forward passes, so it is often far below the length of passages or
answers; dropping would empty pools of long passages (the built-in corpus in 800-character passages is mostly
longer than 128 tokens) and change which examples exist with a compute setting, and `keep` selects on a text the
trainer does not see. Choose `drop` when an answer cut short is worse than no answer (a cut answer ends with the
end-of-turn marker, so it also teaches stopping there).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from sftcurate.core.formats import ROLE_NAMES, RecordError, column, normalize
from sftcurate.core.tokenize import (BOUND_MARGIN_TOKENS, Encoded, encode_example, encode_head, head_ids,
                                     text_bound)
from sftcurate.data_contracts import UserError
from sftcurate.infra import progress

AUTO, CHAT, PLAIN = "auto", "chat", "plain"
TOO_LONG_RULES = ("drop", "cut", "keep")
CHAT_FIELDS = {"messages": ("messages", "role", "content"), "sharegpt": ("conversations", "from", "value")}
RESPONSE_FIELDS = {"text": "text", "prompt_response": "response", "alpaca": "output"}
MAX_CUT_TRIES = 8
PROGRESS_EVERY = 200  # examples between progress reports (a chat template renders a few hundred per second)
# Stands in for an assistant turn's content to find where the template puts it; no real text contains it.
_PROBE = "\x00sftcurate-assistant-content\x00"


class TemplateError(UserError):
    """The template cannot render a record, or the configured template is not usable."""


def check_template(value: str) -> str:
    """`models.template`: auto, chat, plain or a format string with `{prompt}` and `{response}` once each."""
    if value in (AUTO, CHAT, PLAIN):
        return value
    if value.count("{prompt}") != 1 or value.count("{response}") != 1 or \
            value.index("{prompt}") > value.index("{response}"):
        raise ValueError("must be auto, chat, plain or a format string holding {prompt} and then {response} once "
                         f"each, e.g. '### Question:\\n{{prompt}}\\n### Answer:\\n{{response}}'; got {value!r}")
    return value


def resolve_template(tokenizer, template: str) -> str:
    """The template examples are rendered with: `auto` becomes `chat` or `plain`."""
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if template == AUTO:
        return CHAT if has_chat else PLAIN
    if template == CHAT and not has_chat:
        raise TemplateError("models.template is 'chat' but the target's tokenizer has no chat template; "
                            "set models.template to plain, auto or a format string")
    return template


def record_messages(record: dict, fmt: str, columns: dict[str, str], prompt: str, response: str) -> list[dict]:
    """The record as chat messages up to its last assistant turn (what carries loss): every turn of a chat
    (system message included), else one user turn (the prompt, when there is one) and one assistant turn."""
    if fmt in CHAT_FIELDS:
        name, role_key, text_key = CHAT_FIELDS[fmt]
        turns = [{"role": ROLE_NAMES[str(t[role_key]).lower()], "content": t[text_key]}
                 for t in record[column(columns, name)]]
        last = max(i for i, t in enumerate(turns) if t["role"] == "assistant")
        return turns[:last + 1]
    return ([{"role": "user", "content": prompt}] if prompt else []) + [{"role": "assistant", "content": response}]


def _apply(tokenizer, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False)


def render_chat(tokenizer, messages: list[dict]) -> dict:
    """The chat template's rendering of `messages` as segments. An assistant turn's loss segment runs from its
    content to the end of its turn (the end-of-turn marker included, whitespace after it not); where the content
    starts is found by rendering a probe in its place, where the turn ends by rendering the chat up to it."""
    full = _apply(tokenizer, messages)
    segments, cursor = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        upto = _apply(tokenizer, messages[:i + 1])
        probe = _apply(tokenizer, messages[:i] + [{"role": "assistant", "content": _PROBE}])
        start = probe.find(_PROBE)
        if start < cursor or probe[:start] != upto[:start] or not full.startswith(upto):
            raise TemplateError("the target's chat template does not render a chat as the rendering of its "
                                "earlier turns followed by the next one, so the loss tokens cannot be placed; "
                                "set models.template to plain or a format string")
        end = max(len(upto.rstrip()), start)
        segments += [[full[cursor:start], False], [full[start:end], True]]
        cursor = end
    segments.append([full[cursor:], False])
    return {"segments": [s for s in segments if s[0]], "eos": False}


def render_format(template: str, messages: list[dict]) -> dict:
    """A format string per assistant turn, the turns before it (since the last assistant turn) as `{prompt}`."""
    head, tail = template.split("{response}")
    segments, context = [], []
    for message in messages:
        if message["role"] != "assistant":
            context.append(message["content"])
            continue
        segments += [[head.replace("{prompt}", "\n\n".join(context)), False], [message["content"] + tail, True]]
        context = []
    return {"segments": [s for s in segments if s[0]], "eos": True}


@dataclass
class ExampleText:
    """One example's canonical fields (`core.formats.normalize`), its record and its stored rendering."""

    record: dict
    fmt: str
    prompt: str
    response: str
    turns: str = ""       # what the examples table stores: legacy segments for plain, a rendering otherwise

    def rendered(self, tokenizer, template: str, columns: dict[str, str]) -> "ExampleText":
        if template == PLAIN:
            return self
        messages = record_messages(self.record, self.fmt, columns, self.prompt, self.response)
        try:
            rendering = render_chat(tokenizer, messages) if template == CHAT else render_format(template, messages)
        except TemplateError:
            raise
        except Exception as exc:  # a template's own refusal (e.g. roles must alternate) arrives as any type
            raise TemplateError(f"the target's chat template refuses this record's messages "
                                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                                "set models.template to plain or a format string") from None
        return ExampleText(self.record, self.fmt, self.prompt, self.response, json.dumps(rendering,
                                                                                       ensure_ascii=False))

    def encode(self, tokenizer, max_length: int | None = None) -> Encoded:
        return encode_example(tokenizer, self.prompt, self.response, max_length, self.turns)

    def head(self, tokenizer, n: int) -> Encoded:
        """The first `n` tokens of the whole encoding (`core.tokenize.encode_head`)."""
        return encode_head(tokenizer, self.prompt, self.response, n, self.turns)


@dataclass
class Fitted:
    """The examples that stay, rendered and fitted to `max_length`, with their token counts."""

    keep: list[int] = field(default_factory=list)         # input rows kept, in order
    texts: list[ExampleText] = field(default_factory=list)
    context_tokens: list[int] = field(default_factory=list)
    loss_tokens: list[int] = field(default_factory=list)
    template: str = PLAIN
    too_long: str = "cut"
    dropped: int = 0      # longer than max_length and left out (with `cut`: no room for any response token)
    cut: int = 0          # cut to fit
    whole: int = 0        # longer than max_length and kept whole (`keep`)

    def meta(self) -> dict:
        return {"template": self.template, "too_long": self.too_long, "too_long_dropped": self.dropped,
                "too_long_cut": self.cut, "too_long_whole": self.whole}


def fit_examples(tokenizer, template: str, max_length: int, too_long: str, texts: list[ExampleText],
                 columns: dict[str, str], where: list[str] | None = None, heldout=None) -> Fitted:
    """Render every example with `template` and apply the `too_long` rule; `where` names each row for errors.
    Rows marked `heldout` are evaluation data, never selected nor exported: they stay whole and uncounted (the
    held-out loss reads their first max_length tokens, as the fine-tune would, and their token counts are of
    those; generation sees them whole). Only a `keep` record longer than max_length is tokenized whole here."""
    if too_long not in TOO_LONG_RULES:
        raise ValueError(f"too_long must be one of {TOO_LONG_RULES}, got {too_long!r}")
    out = Fitted(template=resolve_template(tokenizer, template), too_long=too_long)
    for row, text in enumerate(texts):
        if (row + 1) % PROGRESS_EVERY == 0 or row + 1 == len(texts):
            progress.step(f"ingest: {out.template} template, too_long {too_long}", row + 1, len(texts),
                          unit="examples")
        try:
            text = text.rendered(tokenizer, out.template, columns)
        except TemplateError as exc:
            raise TemplateError(f"{where[row] if where else f'row {row + 1}'}: {exc}") from None
        # the first max_length + 1 tokens tell whether it fits: a long record is not tokenized whole for that
        whole = text.head(tokenizer, max_length + 1)
        if len(whole.input_ids) > max_length:
            if heldout is not None and heldout[row]:
                whole = text.encode(tokenizer, max_length)  # stays whole, counted as the held-out loss reads it
            elif too_long == "drop":
                out.dropped += 1
                continue
            elif too_long == "cut":
                text = cut_to_fit(tokenizer, out.template, text, columns, max_length)
                if text is None:
                    out.dropped += 1
                    continue
                out.cut += 1
                whole = text.encode(tokenizer)
            else:
                out.whole += 1
                whole = text.encode(tokenizer)  # its budget counts every token of the whole record
        out.keep.append(row)
        out.texts.append(text)
        out.context_tokens.append(len(whole.input_ids) - whole.n_loss)
        out.loss_tokens.append(whole.n_loss)
    return out


def cut_to_fit(tokenizer, template: str, text: ExampleText, columns: dict[str, str],
               max_length: int) -> ExampleText | None:
    """The record cut so its rendering fits `max_length` tokens: turns before the first assistant turn that
    does not fit stay whole, that turn keeps as many of its first tokens as fit, later turns go. When not
    even one token of it fits, the chat ends after the assistant turn before it; None when there is none."""
    messages = record_messages(text.record, text.fmt, columns, text.prompt, text.response)
    last_whole = None  # the last assistant turn that fits whole
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        content, content_ids = _content_head(tokenizer, message["content"], max_length)
        keep, over = len(content_ids), _overflow(tokenizer, template, text, columns, i, content, max_length,
                                                 len(content_ids))
        if over <= 0:
            last_whole = i
            continue
        for _ in range(MAX_CUT_TRIES):  # shorten by the overflow: token boundaries rarely move, 1-2 tries
            keep -= over
            if keep <= 0 or not _prefix(tokenizer, content_ids, keep).strip():
                break
            over = _overflow(tokenizer, template, text, columns, i, _prefix(tokenizer, content_ids, keep), max_length,
                             keep)
            if over <= 0:
                return _cut_record(tokenizer, template, text, columns, i, _prefix(tokenizer, content_ids, keep))
            over = max(over, 1)
        if last_whole is None:
            return None
        return _cut_record(tokenizer, template, text, columns, last_whole, messages[last_whole]["content"])
    return text


def _prefix(tokenizer, ids: list[int], n: int) -> str:
    return tokenizer.decode(ids[:n]).rstrip("\ufffd")  # a prefix may end inside a character


def _content_head(tokenizer, content: str, max_length: int) -> tuple[str, list[int]]:
    """An assistant turn's content and its ids; one longer than `text_bound` characters is first cut after its
    first max_length + BOUND_MARGIN_TOKENS tokens (a cut keeps fewer than max_length of them), so it is never
    tokenized whole. The ids are those of the cut text, so the first shortening step (its tokens less the
    rendering's overflow) lands where it lands from the whole content, and the tokens it keeps are the whole
    content's (cutting a text changes only the tokens next to the cut)."""
    n = max_length + BOUND_MARGIN_TOKENS
    if len(content) > text_bound(tokenizer, n) and getattr(tokenizer, "is_fast", False):  # offsets need a fast one
        _, offsets = head_ids(tokenizer, content, n, offsets=True)
        content = content[:offsets[-1][1]]
    return content, tokenizer(content, add_special_tokens=False)["input_ids"]


def _overflow(tokenizer, template: str, text: ExampleText, columns: dict[str, str], turn: int, content: str,
              max_length: int, keep: int) -> int:
    """Tokens past `max_length` of the record cut after turn `turn` with `content` (large when it is no record).
    Counted up to `keep` + 1 past max_length: an overflow that large leaves no token of the turn (the caller
    stops), whatever its exact size, so a long context is never tokenized whole."""
    candidate = _cut_record(tokenizer, template, text, columns, turn, content)
    if candidate is None:
        return 1 << 30
    return len(candidate.head(tokenizer, max_length + keep + 1).input_ids) - max_length


def _cut_record(tokenizer, template: str, text: ExampleText, columns: dict[str, str], turn: int,
                content: str) -> ExampleText | None:
    """The record with chat turn `turn` (an assistant turn) set to `content` and every later turn removed,
    normalised and rendered again."""
    record = dict(text.record)
    if text.fmt in CHAT_FIELDS:
        name, _, text_key = CHAT_FIELDS[text.fmt]
        key = column(columns, name)
        record[key] = [dict(t) for t in record[key][:turn + 1]]
        record[key][turn][text_key] = content
    else:
        record[column(columns, RESPONSE_FIELDS[text.fmt])] = content
    try:
        prompt, response, turns = normalize(record, text.fmt, columns)
    except RecordError:
        return None
    return ExampleText(record, text.fmt, prompt, response, turns).rendered(tokenizer, template, columns)


def fit_columns(columns: dict[str, list], source, tokenizer, max_length: int, template: str, heldout=None):
    """Ingest's hook: the examples table's columns rendered with `template` and fitted by `source.too_long`.
    Returns the rows that stay (a cut one with its cut record in `raw`: the export gives back what trains),
    their context and loss tokens, and the counts for the artifact's meta."""
    texts = [ExampleText(json.loads(raw), fmt, p, r, t) for raw, fmt, p, r, t in
             zip(columns["raw"], columns["format"], columns["prompt"], columns["response"], columns["turns"])]
    fitted = fit_examples(tokenizer, template, max_length, source.too_long, texts, source.columns, columns["origin"],
                          heldout)
    if fitted.dropped and all(heldout is not None and heldout[i] for i in fitted.keep):
        raise UserError(f"{source.uri}: every pool example is longer than models.max_length ({max_length} tokens "
                        "with the template); raise models.max_length or set source.too_long to cut or keep")
    kept = {name: [values[i] for i in fitted.keep] for name, values in columns.items()}
    for row, (i, text) in enumerate(zip(fitted.keep, fitted.texts)):
        kept["prompt"][row], kept["response"][row], kept["turns"][row] = text.prompt, text.response, text.turns
        if text.record is not texts[i].record:
            kept["raw"][row] = json.dumps(text.record, ensure_ascii=False, default=str)
    return (kept, np.asarray(fitted.context_tokens, dtype=np.int64), np.asarray(fitted.loss_tokens, dtype=np.int64),
            fitted.meta())
