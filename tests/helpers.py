"""Small data builders and process helpers shared by tests."""
from __future__ import annotations

import json
import signal
import subprocess
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


def invoke(*args):
    """`sftcurate ARGS` in this process (typer's runner), wide enough that one error line stays one line."""
    from typer.testing import CliRunner

    from sftcurate.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


def stop(proc: subprocess.Popen) -> None:
    """End a helper server, also one a test stopped with SIGSTOP (a stopped process cannot act on SIGTERM)."""
    proc.send_signal(signal.SIGCONT)
    proc.terminate()
    proc.wait(timeout=20)


def examples_meta(**fields) -> dict:
    """A complete examples manifest meta (`data_contracts.manifests.ExamplesMeta`) for a test-built pool: the
    typed manifest refuses a partial one on read, as it would an artifact of another version."""
    meta = {"fingerprint": "fp-test", "source": "test", "source_fingerprint": "fp-test", "records": 0,
            "duplicates_removed": 0, "formats": {}, "n_examples": 0, "n_train": 0, "n_heldout": 0,
            "train_tokens": 0, "tokenizer": "test", "max_length": 128, "columns": {}, "template": "plain",
            "too_long": "cut", "too_long_dropped": 0, "too_long_cut": 0, "too_long_whole": 0, "skipped_files": {}}
    return {**meta, **fields}
