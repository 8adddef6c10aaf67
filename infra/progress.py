"""A tiny hook for progress: flows report stages, stages report the artifacts they reuse or build, loops
report their steps; the CLI (if any) shows them with rich.

Listeners get (name, event, detail): "start" / "end" / "fail" for a stage; "reused" / "built" for an
artifact (name is its kind, detail {"uri"}); "damaged" for a committed artifact that failed its check and is
rebuilt (detail {"uri", "reason"}); "step" for a loop (name is its section, detail {"step", "steps",
"loss", "unit"}: steps, examples, picks, pairs). A listener that raises stops the work that reported (tests use this to simulate a crash).
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Callable

Listener = Callable[[str, str, dict], None]
_listeners: list[Listener] = []


def subscribe(listener: Listener) -> Callable[[], None]:
    _listeners.append(listener)
    return lambda: _listeners.remove(listener)


def _emit(name: str, event: str, **detail) -> None:
    for listener in list(_listeners):
        listener(name, event, detail)


def artifact(kind: str, uri: str, reused: bool) -> None:
    _emit(kind, "reused" if reused else "built", uri=uri)


def damaged(kind: str, uri: str, reason: str) -> None:
    """A committed artifact failed its check (`infra.store.artifact_damage`) and is being rebuilt."""
    logging.getLogger("sftcurate.store").warning("rebuilding %s: damaged (%s)", uri, reason)
    _emit(kind, "damaged", uri=uri, reason=reason)


def step(section: str, step: int, steps: int, loss: float | None = None, unit: str = "steps") -> None:
    _emit(section, "step", step=step, steps=steps, loss=loss, unit=unit)


@contextmanager
def stage(name: str, timings: dict | None = None):
    """Report `name` as started/finished and record its wall time in `timings` (seconds)."""
    _emit(name, "start")
    start = time.perf_counter()
    outcome = "fail"
    try:
        yield
        outcome = "end"
    finally:
        if timings is not None:
            timings[name] = round(time.perf_counter() - start, 3)
        _emit(name, outcome)
