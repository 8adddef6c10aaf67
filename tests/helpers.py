"""Small data builders shared by tests."""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

TOPICS = ["lists", "dicts", "loops", "classes", "files", "errors", "strings", "numbers"]


def qa_records(n: int = 40) -> list[dict]:
    return [{"prompt": f"Question {i}: how do Python {TOPICS[i % len(TOPICS)]} work in case {i}?",
             "response": f"Answer {i}: Python {TOPICS[i % len(TOPICS)]} behave like this, example number {i} " * 2}
            for i in range(n)]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@contextmanager
def progress_steps(steps: list[int], raise_at: int | None = None, error: type[Exception] = RuntimeError):
    """Collect the training steps reported to `infra.progress`; raising at `raise_at` simulates a crash there."""
    from sftcurate.infra import progress

    def listener(_name: str, event: str, detail: dict) -> None:
        if event == "step":
            steps.append(detail["step"])
            if detail["step"] == raise_at:
                raise error(f"simulated crash after step {raise_at}")

    unsubscribe = progress.subscribe(listener)
    try:
        yield steps
    finally:
        unsubscribe()
