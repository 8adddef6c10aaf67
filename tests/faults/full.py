"""The fault suite in two sizes: a fast subset in `make test`, everything with SFTCURATE_FAULTS_FULL=1
(`SFTCURATE_FAULTS_FULL=1 pytest -m faults tests/faults`; `benchmarks/bench_faults.py` runs it and prints the figures)."""
from __future__ import annotations

import os

import pytest

FULL = os.environ.get("SFTCURATE_FAULTS_FULL", "") not in ("", "0")


def full_only(test):
    """A test of the full suite only (marked slow, skipped in the default subset)."""
    skip = pytest.mark.skipif(not FULL, reason="full fault suite only: set SFTCURATE_FAULTS_FULL=1")
    return pytest.mark.slow(skip(test))


def when_full(fast, full):
    """`full` in the full suite, `fast` in the default subset."""
    return full if FULL else fast
