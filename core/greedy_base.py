"""What every FisherSFT greedy shares, on the host or on a device: its result, how a sentence count or token budget
becomes (k, costs, what fits), the rule check, and progress."""
from __future__ import annotations

import contextlib
import contextvars
import math
from dataclasses import dataclass, field

import numpy as np

from sftcurate.infra import progress


@dataclass
class GreedyResult:
    picks: list[int]
    gains: list[float]
    objective: float               # log det A of the picked set (lam*I included)
    initial: float                 # log det(lam*I) = d log lam; objective - initial = sum(gains)
    evaluations: int               # single-sentence gain evaluations
    seconds: float
    algorithm: str
    info: dict = field(default_factory=dict)


def greedy_setup(obj, k, token_budget, costs):
    """(k, per-sentence costs, which sentences fit the token budget at all)."""
    n = obj.n
    costs = np.asarray(obj.lengths if costs is None else costs, dtype=np.int64)
    if k is None and token_budget is None:
        raise ValueError("set k (sentences) or token_budget (tokens)")
    k = n if k is None else min(int(k), n)
    fits = np.ones(n, dtype=bool) if token_budget is None else costs <= token_budget
    return k, costs, fits


def check_lam(lam: float) -> float:
    """The one library check of lam, for the host and the device objective (the selector's params model refuses
    it before it gets here; direct library callers reach this)."""
    if not lam > 0:
        raise ValueError(f"lam must be > 0, got {lam}")
    return float(lam)


def check_rule(rule: str, token_budget) -> str:
    """The one check of a greedy's rule (`run_greedy` resolves 'celf' into these two first)."""
    if rule not in ("gain", "ratio"):
        raise ValueError(f"rule must be 'celf' (run_greedy), 'ratio' or 'gain', got '{rule}'")
    return rule if token_budget is not None else "gain"


# The progress section a greedy reports under: CELF's two passes name their rule, so the second pass's bar is
# labelled as what it is rather than the first one restarting.
SECTION: contextvars.ContextVar[str] = contextvars.ContextVar("greedy_section", default="greedy")


@contextlib.contextmanager
def greedy_section(name: str):
    """A greedy pass reported as a stage of its own (the terminal draws its bar under this name)."""
    token = SECTION.set(name)
    try:
        with progress.stage(name):
            yield
    finally:
        SECTION.reset(token)


def report_pick(n_picks: int, k: int, used: int, token_budget: int | None) -> None:
    """Progress of a greedy: tokens spent of a token budget, else picks of k."""
    if token_budget is not None:
        progress.step(SECTION.get(), min(used, token_budget), token_budget, unit="tokens")
    else:
        progress.step(SECTION.get(), n_picks, k, unit="picks")


def lazy_loop(obj, state, k: int, costs: np.ndarray, token_budget: int | None) -> tuple[list, list, int]:
    """The lazy greedies' outer loop: ask `state.next_pick` for the naive greedy's pick within what is left of the
    budget, add it, retire its bound. Returns (picks, gains as `obj.add` gave them, tokens used)."""
    used, picks, gains = 0, [], []
    while len(picks) < k:
        i = state.next_pick(len(picks), None if token_budget is None else token_budget - used)
        if i is None:
            break
        gains.append(obj.add(i))
        picks.append(i)
        used += int(costs[i])
        state.ub[i] = -math.inf
        report_pick(len(picks), k, used, token_budget)
    return picks, gains, used
