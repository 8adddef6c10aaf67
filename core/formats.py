"""Record formats -> the canonical (prompt, response, turns) example.

`turns` is "" unless a chat has more than one assistant turn; then it is the whole chat as JSON segments
`[[text, is_loss], ...]` whose concatenation is prompt + response, so the loss covers every assistant turn.

Supported: plain text, prompt/response, Alpaca (instruction/input/output), OpenAI chat `messages`,
ShareGPT `conversations`. Column names are configurable through `columns` (canonical name -> column).
"""
from __future__ import annotations

import json

FORMAT_COLUMNS = {
    "text": ("text",),
    "prompt_response": ("prompt", "response"),
    "alpaca": ("instruction", "output"),
    "messages": ("messages",),
    "sharegpt": ("conversations",),
}
# Tried in this order by "auto": the most specific shape first.
AUTO_ORDER = ("messages", "sharegpt", "alpaca", "prompt_response", "text")
ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
              "bing": "assistant", "bard": "assistant", "model": "assistant", "system": "system", "tool": "tool"}


class RecordError(ValueError):
    """A record is malformed; the message names the field (the caller adds file and row)."""


def column(columns: dict[str, str], name: str) -> str:
    return columns.get(name, name)


def detect_format(keys: set[str], columns: dict[str, str]) -> str | None:
    for fmt in AUTO_ORDER:
        if all(column(columns, c) in keys for c in FORMAT_COLUMNS[fmt]):
            return fmt
    return None


def _text(record: dict, columns: dict[str, str], name: str, required: bool = True) -> str:
    key = column(columns, name)
    if key not in record:
        if required:
            raise RecordError(f"field '{key}' is missing")
        return ""
    value = record[key]
    if value is None:
        if required:
            raise RecordError(f"field '{key}' is null")
        return ""
    if not isinstance(value, str):
        raise RecordError(f"field '{key}' must be a string, got {type(value).__name__}")
    return value


def _render_turns(turns: list[tuple[str, str]]) -> str:
    return "\n".join(f"{role.capitalize()}: {text}" for role, text in turns)


def _chat(record: dict, columns: dict[str, str], name: str, role_key: str, text_key: str) -> tuple[str, str, str]:
    key = column(columns, name)
    turns = record.get(key)
    if turns is None:
        raise RecordError(f"field '{key}' is missing or null")
    if not isinstance(turns, list) or not turns:
        raise RecordError(f"field '{key}' must be a non-empty list of turns")
    parsed = []
    for t, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
            raise RecordError(f"field '{key}[{t}]' must have '{role_key}' and '{text_key}'")
        role = ROLE_NAMES.get(str(turn[role_key]).lower())
        if role is None:
            raise RecordError(f"field '{key}[{t}].{role_key}' has unknown role '{turn[role_key]}'")
        if not isinstance(turn[text_key], str):
            raise RecordError(f"field '{key}[{t}].{text_key}' must be a string")
        parsed.append((role, turn[text_key]))
    last = max((i for i, (role, _) in enumerate(parsed) if role == "assistant"), default=None)
    if last is None:
        raise RecordError(f"field '{key}' has no assistant turn to learn from")
    # The prompt is everything before the last assistant turn (what generation and the judge see).
    prompt = _render_turns(parsed[:last]) + ("\nAssistant:" if last else "")
    return prompt, parsed[last][1], chat_segments(parsed[:last + 1])


def chat_segments(turns: list[tuple[str, str]]) -> str:
    """Every assistant turn a loss segment, everything else context; "" when only the last turn is a loss turn
    (the plain prompt/response split says the same)."""
    if sum(role == "assistant" for role, _ in turns) < 2:
        return ""
    segments: list[list] = []
    context = ""
    for i, (role, text) in enumerate(turns):
        head = ("\n" if i else "") + f"{role.capitalize()}:"
        if role == "assistant":
            segments += [[context + head + " ", False], [text, True]]
            context = ""
        else:
            context += f"{head} {text}"
    return json.dumps(segments, ensure_ascii=False)


def normalize(record: dict, fmt: str, columns: dict[str, str]) -> tuple[str, str, str]:
    if not isinstance(record, dict):
        raise RecordError(f"record must be an object, got {type(record).__name__}")
    if fmt == "text":
        return "", _text(record, columns, "text"), ""
    if fmt == "prompt_response":
        return _text(record, columns, "prompt"), _text(record, columns, "response"), ""
    if fmt == "alpaca":
        instruction = _text(record, columns, "instruction")
        extra = _text(record, columns, "input", required=False)
        return instruction + (f"\n\n{extra}" if extra else ""), _text(record, columns, "output"), ""
    if fmt == "messages":
        return _chat(record, columns, "messages", "role", "content")
    if fmt == "sharegpt":
        return _chat(record, columns, "conversations", "from", "value")
    raise RecordError(f"unknown format '{fmt}'")
