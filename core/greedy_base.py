"""What every FisherSFT greedy shares, on the host or on a device: its result, how a sentence count or token budget
becomes (k, costs, what fits), the rule check, and progress."""
from __future__ import annotations

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


def check_rule(rule: str, token_budget) -> str:
    """The one check of a greedy's rule (`run_greedy` resolves 'celf' into these two first)."""
    if rule not in ("gain", "ratio"):
        raise ValueError(f"rule must be 'celf' (run_greedy), 'ratio' or 'gain', got '{rule}'")
    return rule if token_budget is not None else "gain"


def report_pick(n_picks: int, k: int, used: int, token_budget: int | None) -> None:
    """Progress of a greedy: tokens spent of a token budget, else picks of k."""
    if token_budget is not None:
        progress.step("greedy", min(used, token_budget), token_budget, unit="tokens")
    else:
        progress.step("greedy", n_picks, k, unit="picks")
