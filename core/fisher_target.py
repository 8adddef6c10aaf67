"""Targeted FisherSFT: a transductive, V-optimal design that picks the pool sentences which most reduce the
predictive variance of a target's tokens under the same last-layer model as FisherSFT.

With x the pre-logit feature of a loss token, A(S) = lam I + sum over picked sentences i of X_i^T X_i (X_i: the
sentence's [L_i, d] token rows) and C = sum over target tokens of x x^T, the objective to minimise is

    V(S) = sum over target tokens of x^T A(S)^-1 x = trace(A(S)^-1 C),

the summed predictive variance of the target under a Gaussian last-layer model with a ridge prior. Adding
sentence i changes A^-1 by an exact rank-L_i Woodbury update, so its gain (the variance it removes) is

    gain_i(S) = V(S) - V(S + i) = trace(M_i^-1 X_i G X_i^T),  M_i = I + X_i B X_i^T,  B = A^-1,  G = B C B,

which costs O(L d^2) per sentence given B and G (kept current, d x d, in float64). For the naive greedy (every gain
at every pick), when the pool's rows fit in `CACHE_BYTES` (three float64 copies), X B and X G are kept for every
row instead and follow each pick by the same rank-L_s Woodbury terms (O(L_s d) per row, against O(d^2) to form them
again), recomputed exactly every `REFRESH_PICKS` picks so rounding cannot build up, and the sentences of one length
sit next to each other so that their gains need no gather or padding. Measured (one thread, N = 4,000 sentences of
2-8 tokens, a 250-token target, K = 40): 65.5 s of CPU per run without the cache, 7.1 s with it at d = 576 (11.0 s
and 2.7 s at d = 256), with the same picks; `tests/test_targeted.py` holds both paths to the same picks and
objective.

Submodularity: V(empty) - V(S) is monotone but NOT submodular in general: variance reduction is submodular only
when no feature "suppresses" another (Das & Kempe 2008; Krause, Singh & Guestrin 2008), and a sentence can make
another's direction count more once it is picked. Hence:
  - `naive` (the default) evaluates every candidate's exact gain at every pick: the greedy itself.
  - `lazy` re-evaluates only the candidate with the largest stale gain and accepts it when its fresh gain is at
    least every other candidate's stale gain. It then picks what the naive greedy picks whenever no
    candidate's gain has grown since it was last evaluated (always true for a submodular objective). Here that
    can fail: `info["lazy_bound_violations"]` counts re-evaluations whose fresh gain exceeded the stale one
    (evidence of non-submodularity seen on this run; a violation on a candidate never re-evaluated goes
    unseen, so 0 does not prove the picks equal the naive greedy's). Under weak submodularity with ratio
    gamma the greedy keeps a 1 - e^-gamma guarantee (Das & Kempe 2011); the lazy variant has none beyond
    that of the picks it happens to share with the greedy.
Token budgets follow FisherSFT's: `gain` (largest gain that fits), `ratio` (gain per loss token that fits), or
`celf` (run both, keep the lower final V).
"""
from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from sftcurate.core.feature_rows import check_features
from sftcurate.core.fisher_features import row_index
from sftcurate.core.selectors.base import Budget, SelectionResult, SelectorInputs, pool_token_features
from sftcurate.core.target import target_features
from sftcurate.infra import progress

ROWS_PER_CHUNK = 1 << 15  # padded token rows per batched gain evaluation (memory ~ rows * d * 8 B * 3)
CACHE_BYTES = 3 << 30     # X, X B and X G of every pool row in float64 when they fit in this; else per pick
REFRESH_PICKS = 32        # picks between exact recomputations of the cached X B and X G


def _take(features, rows: np.ndarray) -> np.ndarray:
    """Rows by global index of in-memory or sharded (memory-mapped) features, as float64."""
    if not isinstance(features, np.ndarray) and hasattr(features, "take"):  # ShardedRows, memory-mapped shards
        return np.asarray(features.take(rows), dtype=np.float64)
    return np.asarray(features[rows], dtype=np.float64)


def _rows(features, lo: int, hi: int) -> np.ndarray:
    """Rows lo..hi of in-memory or sharded (memory-mapped) features as float64."""
    return _take(features, np.arange(lo, hi, dtype=np.int64))


def target_second_moment(target_features, chunk_rows: int = 1 << 16) -> np.ndarray:
    """C = sum over target tokens of x x^T (float64, [d, d])."""
    n, d = int(target_features.shape[0]), int(target_features.shape[1])
    moment = np.zeros((d, d), dtype=np.float64)
    for lo in range(0, n, chunk_rows):
        rows = _rows(target_features, lo, min(n, lo + chunk_rows))
        moment += rows.T @ rows
    return moment


class TargetVariance:
    """V(S) = trace((lam I + sum_{i in S} X_i^T X_i)^-1 C) with its exact Woodbury gains and updates."""

    def __init__(self, features, offsets, target_moment: np.ndarray, lam: float, cache: bool = True):
        if lam <= 0:
            raise ValueError(f"lam must be > 0, got {lam}")
        self.features, self.offsets = check_features(features, offsets, "pool features")
        d = int(self.features.shape[1])
        if target_moment.shape != (d, d):
            raise ValueError(f"target features have d={target_moment.shape[0]} but the pool's have d={d}; "
                             "embed both with the same model and projection")
        self.n, self.d, self.lam = len(self.offsets) - 1, d, float(lam)
        self.lengths = np.diff(self.offsets)
        self.moment = np.asarray(target_moment, dtype=np.float64)
        self.inverse = np.eye(d) / lam                           # B = A^-1
        self.weighted = self.moment / (lam * lam)                # G = B C B
        self.value = float(np.trace(self.moment)) / lam         # V(empty)
        self.evaluations = 0
        self.cached = cache and 3 * int(self.offsets[-1]) * d * 8 <= CACHE_BYTES
        if self.cached:
            self._cache_rows()
            self._refresh()

    def _cache_rows(self) -> None:
        """The pool's rows in float64, sentences of one length next to each other, so that each length's rows
        (and their X B and X G) are one [n, L, d] view: gains without a gather or padding."""
        order = np.argsort(self.lengths, kind="stable")
        order = order[self.lengths[order] > 0]
        lengths = self.lengths[order]
        start = np.zeros(self.n, dtype=np.int64)                      # sentence -> its first cached row
        start[order] = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(order) else []
        self.x = torch.from_numpy(_take(self.features, row_index(self.offsets, order, lengths)))
        self.blocks = []                                                # (length, sentences, first row)
        for length in np.unique(lengths):
            ids = order[lengths == length]
            self.blocks.append((int(length), ids, int(start[ids[0]])))

    def _refresh(self) -> None:
        """X B and X G of every row, exactly (the cache's starting point, and every REFRESH_PICKS picks)."""
        self.xb = self.x @ torch.from_numpy(self.inverse)
        self.xg = self.x @ torch.from_numpy(self.weighted)
        self.picks_since_refresh = 0

    def sentence(self, i: int) -> np.ndarray:
        return _rows(self.features, int(self.offsets[i]), int(self.offsets[i + 1]))

    def gain(self, i: int) -> float:
        """Exact variance reduction of adding sentence i to the current set."""
        x = self.sentence(i)
        self.evaluations += 1
        if not len(x):
            return 0.0
        m = np.eye(len(x)) + x @ self.inverse @ x.T
        return float(np.trace(np.linalg.solve(m, x @ self.weighted @ x.T)))

    def gains(self, candidates: np.ndarray) -> np.ndarray:
        """Exact gains of many sentences at once: rows padded to the longest sentence of a chunk (a zero row
        adds 1 to M's diagonal and 0 to the numerator, so it changes nothing)."""
        candidates = np.asarray(candidates, dtype=np.int64)
        self.evaluations += len(candidates)
        if self.cached:      # every sentence's gain costs about what a gather of the candidates' rows would
            every = np.zeros(self.n, dtype=np.float64)
            for length, ids, first in self.blocks:
                every[ids] = self._block_gains(length, len(ids), first)
            return every[candidates]
        out = np.zeros(len(candidates), dtype=np.float64)
        lengths = self.lengths[candidates]
        start = 0
        while start < len(candidates):
            width = max(int(lengths[start]), 1)
            stop = start + 1
            while stop < len(candidates) and (stop - start + 1) * max(width, int(lengths[stop])) <= ROWS_PER_CHUNK:
                width = max(width, int(lengths[stop]))
                stop += 1
            out[start:stop] = self._padded_gains(candidates[start:stop], width)
            start = stop
        return out

    def _block_gains(self, length: int, n: int, first: int) -> np.ndarray:
        """Gains of the n sentences of `length` rows cached from row `first` on, from X B and X G."""
        block = slice(first, first + n * length)
        x, xb, xg = (a[block].view(n, length, self.d) for a in (self.x, self.xb, self.xg))
        xt = x.transpose(1, 2)
        m = torch.eye(length, dtype=torch.float64) + torch.bmm(xb, xt)
        return torch.linalg.solve(m, torch.bmm(xg, xt)).diagonal(dim1=1, dim2=2).sum(-1).numpy()

    def _padded_gains(self, sentences: np.ndarray, width: int) -> np.ndarray:
        lengths = self.lengths[sentences]
        slot = np.arange(width)[None, :] < lengths[:, None]                  # [n, width]: a real row
        rows = (self.offsets[sentences][:, None] + np.arange(width)[None, :])[slot]
        x = np.zeros((len(sentences), width, self.d), dtype=np.float64)
        x[slot] = _take(self.features, rows)                                  # one gather for the whole chunk
        xt = x.transpose(0, 2, 1)
        m = np.eye(width)[None] + (x @ self.inverse) @ xt
        numerator = (x @ self.weighted) @ xt
        return np.trace(np.linalg.solve(m, numerator), axis1=1, axis2=2)

    def add(self, i: int) -> float:
        """Add sentence i: B <- B - B X^T M^-1 X B (exact rank-L Woodbury), G <- B C B. Returns its gain."""
        x = self.sentence(i)
        if not len(x):
            return 0.0
        bx = self.inverse @ x.T                                  # [d, L]
        m = np.eye(len(x)) + x @ bx
        inverse = self.inverse - bx @ np.linalg.solve(m, bx.T)
        if self.cached:
            self._follow(bx, np.linalg.inv(m))
        self.inverse = (inverse + inverse.T) / 2.0
        self.weighted = self.inverse @ self.moment @ self.inverse
        if self.cached and self.picks_since_refresh >= REFRESH_PICKS:
            self._refresh()
        new_value = float(np.trace(self.inverse @ self.moment))
        gain, self.value = self.value - new_value, new_value
        return gain

    def _follow(self, p: np.ndarray, q: np.ndarray) -> None:
        """The cache after B <- B - P Q P^T (P = B X_s^T, Q = M_s^-1): X B loses (X P) Q P^T, and with
        G = B C B, X G loses (X B C P) Q P^T + (X P) Q P^T C B - (X P) Q (P^T C P) Q P^T (all on the old B)."""
        q = (q + q.T) / 2.0
        cp = self.moment @ p                              # C P, [d, L_s]
        qpt = q @ p.T                                     # Q P^T, [L_s, d]
        t = torch.from_numpy
        xp = self.x @ t(np.ascontiguousarray(p))          # X P = X B X_s^T, [R, L_s]
        left = torch.cat([self.xb @ t(cp), xp], dim=1)    # [X B C P, X P]
        right = np.concatenate([qpt, q @ (cp.T @ self.inverse) - q @ (p.T @ cp) @ qpt])
        # in place, one pass over each cached array: no [R, d] temporaries
        self.xg.addmm_(left, t(right), alpha=-1.0)
        self.xb.addmm_(xp, t(qpt), alpha=-1.0)
        self.picks_since_refresh += 1


def target_variance(features, offsets, target_moment: np.ndarray, lam: float, picks) -> float:
    """V(picks) computed directly (one inverse): what a test or a report checks the greedy against."""
    features, offsets = check_features(features, offsets, "pool features")
    d = int(features.shape[1])
    a = lam * np.eye(d)
    for i in picks:
        x = _rows(features, int(offsets[i]), int(offsets[i + 1]))
        a += x.T @ x
    return float(np.trace(np.linalg.solve(a, target_moment)))


@dataclass
class TargetedResult:
    picks: list[int]
    gains: list[float]
    objective: float        # V of the picked set (lower is better)
    initial: float          # V(empty) = trace(C) / lam; initial - objective = sum(gains)
    evaluations: int
    seconds: float
    algorithm: str
    info: dict = field(default_factory=dict)


def _key(gains: np.ndarray, costs: np.ndarray, rule: str) -> np.ndarray:
    return gains / np.maximum(costs, 1) if rule == "ratio" else gains


def _greedy(objective: TargetVariance, k: int | None, token_budget: int | None, rule: str, lazy: bool,
            costs: np.ndarray | None = None):
    """One greedy run. Ties go to the lowest index. Returns (picks, gains, bound violations seen)."""
    costs = objective.lengths if costs is None else costs
    k = objective.n if k is None else min(int(k), objective.n)
    picks, gains, used, violations = [], [], 0, 0
    available = np.ones(objective.n, dtype=bool)
    if token_budget is not None:
        available &= costs <= token_budget
    heap: list[tuple[float, int]] = []
    if lazy:
        cand = np.flatnonzero(available)
        keys = _key(objective.gains(cand), costs[cand], rule)
        heap = [(-float(v), int(i)) for v, i in zip(keys, cand)]
        heapq.heapify(heap)
    while len(picks) < k:
        if token_budget is not None:
            available &= costs <= token_budget - used
        if lazy:
            best = _lazy_pick(objective, heap, available, costs, rule)
            if best is None:
                break
            pick, grown = best
            violations += grown
        else:
            cand = np.flatnonzero(available)
            if not len(cand):
                break
            keys = _key(objective.gains(cand), costs[cand], rule)
            pick = int(cand[int(np.argmax(keys))])                   # argmax: first (lowest index) of ties
        gains.append(objective.add(pick))
        picks.append(pick)
        available[pick] = False
        used += int(costs[pick])
        progress.step("greedy", len(picks) if token_budget is None else min(used, token_budget),
                      k if token_budget is None else token_budget, unit="picks" if token_budget is None else "tokens")
    return picks, gains, violations


def _lazy_pick(objective: TargetVariance, heap: list, available: np.ndarray, costs: np.ndarray, rule: str):
    """Pop stale keys until one candidate's fresh key is at least the next stale key (see the module's note on
    what that guarantees here). Returns (pick, how many re-evaluated keys had grown past their stale value) or
    None when nothing fits."""
    grown = 0
    while heap:
        stale, i = heapq.heappop(heap)
        if not available[i]:
            continue            # picked, or too long for the token budget left (which only shrinks)
        fresh = float(_key(np.array([objective.gain(i)]), costs[i:i + 1], rule)[0])
        grown += int(fresh > -stale * (1 + 1e-9) + 1e-12)
        while heap and not available[heap[0][1]]:
            heapq.heappop(heap)
        if not heap or fresh >= -heap[0][0]:
            return i, grown
        heapq.heappush(heap, (-fresh, i))
    return None


def targeted_greedy(features, offsets, target_features, lam: float = 1.0, k: int | None = None,
                    token_budget: int | None = None, algorithm: str = "naive", rule: str = "celf",
                    costs=None) -> TargetedResult:
    """Greedily minimise V(S) (module docstring) over the pool's sentences within k sentences and/or
    `token_budget` loss tokens (a sentence costs `costs`, its loss tokens, or without them its rows: not the
    same when the rows are rank-r sentence factors, `embedding.sentence_rank`)."""
    if algorithm not in ("naive", "lazy"):
        raise ValueError(f"algorithm must be 'naive' or 'lazy', got '{algorithm}'")
    if rule not in ("celf", "gain", "ratio"):
        raise ValueError(f"rule must be 'celf', 'gain' or 'ratio', got '{rule}'")
    if k is None and token_budget is None:
        raise ValueError("set k (sentences) or token_budget (tokens)")
    start = time.perf_counter()
    moment = target_second_moment(target_features)
    rules = ["gain"] if token_budget is None else (["ratio", "gain"] if rule == "celf" else [rule])
    runs = []
    for one in rules:
        # the cache pays when every gain is evaluated at every pick; the lazy greedy evaluates a few
        objective = TargetVariance(features, offsets, moment, lam, cache=algorithm == "naive")
        initial = objective.value
        picks, gains, violations = _greedy(objective, k, token_budget, one, algorithm == "lazy",
                                           None if costs is None else np.asarray(costs, dtype=np.int64))
        runs.append((objective.value, one, picks, gains, violations, objective.evaluations, initial))
    value, used_rule, picks, gains, violations, evaluations, initial = min(runs, key=lambda r: (r[0], r[1]))
    info = {"lam": float(lam), "rule": used_rule, "target_tokens": int(target_features.shape[0]),
            "initial_variance": initial, "final_variance": value,
            "variance_kept_share": value / initial if initial > 0 else 0.0,
            "evaluations_all_runs": int(sum(r[5] for r in runs))}
    if algorithm == "lazy":
        info["lazy_bound_violations"] = int(violations)
    return TargetedResult(picks=[int(p) for p in picks], gains=[float(g) for g in gains], objective=float(value),
                          initial=float(initial), evaluations=int(evaluations),
                          seconds=time.perf_counter() - start, algorithm=algorithm, info=info)


def targeted_selection(inputs: SelectorInputs, budget: Budget, method: str, lam: float, algorithm: str,
                       rule: str) -> SelectionResult:
    """A selection by the targeted greedy on the pool's token features against the loaded target's (the
    selector `fishersft_target`, and `fishersft` when a target is set)."""
    features, offsets = pool_token_features(inputs, method)
    target, _ = target_features(inputs, features.shape[1], method)
    # not under `one_thread` as the log-det greedies: its batched solves use both cores (bench_targeted's pool,
    # N=4,000, K=200: naive 14.1 s on two threads, 18.6 s on one; lazy 0.96 s either way)
    res = targeted_greedy(features, offsets, target, lam=lam, k=budget.examples, token_budget=budget.tokens,
                          algorithm=algorithm, rule=rule, costs=inputs.token_counts)
    return SelectionResult(indices=res.picks, gains=res.gains, objective=res.objective,
                           info={**res.info, "algorithm": res.algorithm, "evaluations": res.evaluations,
                                 "seconds": res.seconds, "target": True})
