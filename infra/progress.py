"""A tiny hook for terminal progress: flows report stages, the CLI (if any) shows them with rich."""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable

_listeners: list[Callable[[str, str], None]] = []


def subscribe(listener: Callable[[str, str], None]) -> Callable[[], None]:
    _listeners.append(listener)
    return lambda: _listeners.remove(listener)


@contextmanager
def stage(name: str, timings: dict | None = None):
    """Report `name` as started/finished and record its wall time in `timings` (seconds)."""
    for listener in list(_listeners):
        listener(name, "start")
    start = time.perf_counter()
    outcome = "fail"
    try:
        yield
        outcome = "end"
    finally:
        if timings is not None:
            timings[name] = round(time.perf_counter() - start, 3)
        for listener in list(_listeners):
            listener(name, outcome)
