"""Small data builders shared by tests."""
from __future__ import annotations

import json
from pathlib import Path

TOPICS = ["lists", "dicts", "loops", "classes", "files", "errors", "strings", "numbers"]


def qa_records(n: int = 40) -> list[dict]:
    return [{"prompt": f"Question {i}: how do Python {TOPICS[i % len(TOPICS)]} work in case {i}?",
             "response": f"Answer {i}: Python {TOPICS[i % len(TOPICS)]} behave like this, example number {i} " * 2}
            for i in range(n)]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path
