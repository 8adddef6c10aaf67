"""Greedy optimizers for FisherSFT's log-det objective (`core.fisher.LogDetObjective`): naive, lazy (stale
gains are upper bounds, so it picks exactly what the naive greedy picks) and stochastic, each under a sentence
count or a token budget, ties broken by the lowest index after `quantize`."""
from __future__ import annotations

import contextlib
import math
import time

import numpy as np

from sftcurate.core.feature_rows import check_features
from sftcurate.core.fisher import LogDetObjective, pick_device, quantize
from sftcurate.core.fisher_device import DeviceLogDet, device_lazy_greedy
from sftcurate.core.greedy_base import (GreedyResult, check_rule, greedy_setup, greedy_section,  # noqa: F401
                                       lazy_loop, report_pick)  # GreedyResult re-exported
from sftcurate.infra.runners import one_thread


def _keys(gains: np.ndarray, cand: np.ndarray, costs: np.ndarray, rule: str) -> np.ndarray:
    if rule == "ratio":
        return quantize(gains / np.maximum(costs[cand], 1))
    return quantize(gains)


def _sampled_greedy(obj: LogDetObjective, k, token_budget, costs, rule: str, fits, candidates) -> tuple:
    """The greedy loop naive and stochastic greedy share: each step drops what no longer fits the budget,
    evaluates `candidates(remaining)` (positions into `remaining`, ascending) and takes the best key, lowest
    index on ties. Returns (picks, gains, tokens used)."""
    remaining = np.flatnonzero(fits)
    used, picks, gains = 0, [], []
    while len(picks) < k:
        if token_budget is not None:
            remaining = remaining[costs[remaining] <= token_budget - used]
        if len(remaining) == 0:
            break
        positions = candidates(remaining)
        sample = remaining[positions]
        keys = _keys(obj.gains(sample), sample, costs, rule)
        j = int(np.argmax(keys))  # sample is ascending: argmax returns the lowest index among ties
        i = int(sample[j])
        gains.append(obj.add(i))
        picks.append(i)
        used += int(costs[i])
        remaining = np.delete(remaining, positions[j])
        report_pick(len(picks), k, used, token_budget)
    return picks, gains, used


def naive_greedy(obj: LogDetObjective, k: int | None = None, token_budget: int | None = None,
                 costs=None, rule: str = "ratio") -> GreedyResult:
    """Re-evaluates every remaining candidate at every step (batched), picks the best key, lowest index on ties."""
    t0 = time.perf_counter()
    rule = check_rule(rule, token_budget)
    k, costs, fits = greedy_setup(obj, k, token_budget, costs)
    picks, gains, used = _sampled_greedy(obj, k, token_budget, costs, rule, fits, lambda rem: np.arange(len(rem)))
    return GreedyResult(picks, gains, obj.value(), obj.initial_value(), obj.n_evals,
                        time.perf_counter() - t0, "naive", {"rule": rule, "tokens": used})


class _Front:
    """The alive candidates with the `size` highest upper-bound keys, ascending by index; every other alive
    candidate's bound is at most `outside`. A step decides within the front while its best key exceeds
    `outside` (then no outside candidate can win or tie), so per-round work is O(size), not O(N)."""

    def __init__(self, size: int):
        self.size = size
        self.idx = np.zeros(0, dtype=np.int64)
        self.outside = math.inf

    def refill(self, ub: np.ndarray, affordable: np.ndarray | None) -> None:
        ok = ub > -math.inf if affordable is None else (ub > -math.inf) & affordable
        alive = np.flatnonzero(ok)
        if len(alive) <= self.size:
            self.idx, self.outside = alive, -math.inf
            return
        vals = ub[alive]
        cut = np.partition(vals, len(vals) - self.size)[len(vals) - self.size]
        inside = vals >= cut
        self.idx, self.outside = alive[inside], float(vals[~inside].max())


class ScreenSwitch:
    """Whether the float32 screen pays for itself, measured as the lazy greedy runs.

    A screened step's cost is its wall time; what the plain lazy greedy (float64 gains of the stale candidates
    whose bound reaches the pick, no screen) would have spent at that step is estimated as the number of such
    candidates, from each one's stale gain (its last float64 or float32 gain, else its bound), times the
    measured time of one float64 gain. While the screened steps' decayed cost exceeds the decayed estimate by
    a quarter, the greedy evaluates plainly; it probes the screen again after `probe` plain picks (the interval
    doubles after each probe that loses, up to `max_probe`). Both modes pick exactly what the naive greedy
    picks; only their cost differs."""

    DECAY = 0.7         # weight of the past in the decayed sums, per screened step (times are wall seconds:
                        # a CPU-time clock read cost ~0.2 ms inside the greedy here, against 0.5 us, and the
                        # neighbours of a shared machine slow both sides of the comparison alike)
    MIN_BATCH = 16      # float64 batches smaller than this are mostly overhead: not timed
    HYSTERESIS = 1.25   # step aside only when the screen costs this much more: times on a shared machine
                        # jitter by ~10-20%, and a wrong switch to plain costs more than a late one

    def __init__(self, enabled: bool, probe: int = 16, max_probe: int = 256, warmup: int = 3):
        self.enabled, self.probe, self.max_probe, self.warmup = enabled, probe, max_probe, warmup
        self.first_probe = probe
        self.screening = True
        self.spent = self.plain = 0.0        # decayed screened seconds, decayed plain estimates
        self.t64 = self.n64 = 0.0            # decayed float64 seconds and gains (batches >= MIN_BATCH)
        self.screened_steps = 0
        self.plain_until = 0                 # the step at which plain evaluation probes the screen again
        self.stats = {"plain_steps": 0, "switches_to_plain": 0}

    def timed_float64(self, seconds: float, count: int) -> None:
        if count >= self.MIN_BATCH:
            self.t64, self.n64 = self.DECAY * self.t64 + seconds, self.DECAY * self.n64 + count

    def screen_at(self, step: int) -> bool:
        """Screen at this step? (a probe when plain evaluation is due to try the screen again)"""
        self.screening = not self.enabled or step >= self.plain_until
        if not self.screening:
            self.stats["plain_steps"] += 1
        return self.screening

    def observe(self, step: int, seconds: float, plain_candidates: int) -> None:
        """After a screened step: its wall time and how many float64 gains the plain greedy would have taken."""
        if not self.enabled or not self.screening or self.n64 == 0:
            return
        self.spent = self.DECAY * self.spent + seconds
        self.plain = self.DECAY * self.plain + plain_candidates * self.t64 / self.n64
        self.screened_steps += 1
        if self.screened_steps >= self.warmup and self.spent > self.HYSTERESIS * self.plain:
            self.stats["switches_to_plain"] += 1
            self.plain_until = step + 1 + self.probe
            self.probe = min(2 * self.probe, self.max_probe)
            # a probe decides alone (its one step against the plain estimate), not diluted by the past
            self.spent = self.plain = 0.0
            self.screened_steps = self.warmup - 1
        elif self.screened_steps >= self.warmup:
            self.probe = self.first_probe


class _LazyState:
    """Upper/lower bound keys of every candidate and what is known about each at the current step.

    ub: an upper bound of the candidate's exact (float64, quantized) key: a stale key, a Jensen trace bound or a
    float32 gain plus its margin. At the current step a candidate may be `fresh` (float32 gain known, lb a lower
    bound of the key) and then `exact` (float64 key known, ub == lb == key)."""

    def __init__(self, obj: LogDetObjective, costs: np.ndarray, rule: str, fits: np.ndarray, front: int,
                 batch: int, max_batch: int, switch: ScreenSwitch):
        n = obj.n
        self.obj, self.costs, self.batch, self.max_batch, self.switch = obj, costs, batch, max_batch, switch
        self.div = np.maximum(costs, 1).astype(np.float64) if rule == "ratio" else np.ones(n)
        self.ub = np.where(fits, math.inf, -math.inf)
        self.lb = np.full(n, -math.inf)
        self.g32 = np.full(n, np.nan)
        self.eps = np.zeros(n)
        self.fresh = np.full(n, -1, dtype=np.int64)
        self.exact = np.zeros(n, dtype=bool)
        self.affordable: np.ndarray | None = None
        self.front = _Front(front)
        self.tau = -math.inf
        if switch.plain_until > 0:  # screen="never": every gain at A = lam I in float64
            self._plain(np.flatnonzero(fits), 0)
        else:
            self.tau = self._evaluate(np.flatnonzero(fits), 0, -math.inf)  # every gain at A = lam I, in float32
        self.last_block = batch
        self.screened_bounds: list[np.ndarray] = []
        self.screened_estimates: list[np.ndarray] = []
        self.stats = {"rounds": 0, "rechecks": 0, "margin_violations": 0, "max_error_over_margin": 0.0}

    def _evaluate(self, cand: np.ndarray, step: int, tau: float) -> float:
        """Screen `cand` in float32 against `tau`; returns the best lower-bound key found (or tau)."""
        if len(cand) == 0:
            return tau
        g, ub, eps = self.obj.screen32(cand, tau, self.div[cand])
        self.ub[cand] = np.minimum(self.ub[cand], quantize(ub / self.div[cand]))
        full = np.isfinite(g)
        idx = cand[full]
        if len(idx) == 0:
            return tau
        self.g32[idx], self.eps[idx] = g[full], eps[full]
        self.lb[idx] = quantize((g[full] - eps[full]) / self.div[idx])
        self.fresh[idx], self.exact[idx] = step, False
        return max(tau, float(self.lb[idx].max()))

    def _recheck(self, F: np.ndarray, step: int) -> None:
        """Float64 gains of the fresh float32 candidates that can still win (ub >= tau)."""
        idx = F[(self.fresh[F] == step) & ~self.exact[F] & (self.ub[F] >= self.tau)]
        timed = len(idx) >= self.switch.MIN_BATCH  # a smaller batch times its overhead, not its gains
        t0 = time.perf_counter() if timed else 0.0
        g64 = self.obj.gains(idx)
        if timed:
            self.switch.timed_float64(time.perf_counter() - t0, len(idx))
        ratio = np.abs(g64 - self.g32[idx]) / np.maximum(self.eps[idx], 1e-300)
        self.stats["max_error_over_margin"] = max(self.stats["max_error_over_margin"], float(ratio.max()))
        if (ratio > 0.5).any():  # closer to the margin than ever measured: widen it for the rest of the run
            self.stats["margin_violations"] += int((ratio > 0.5).sum())
            self.obj.widen_margin()
        keys = quantize(g64 / self.div[idx])
        self.ub[idx] = self.lb[idx] = keys
        self.exact[idx] = True
        self.tau = max(self.tau, float(keys.max()))
        self.stats["rechecks"] += len(idx)

    def _block(self, F: np.ndarray, step: int, size: int) -> None:
        """Screen the `size` stale candidates with the highest bounds; the first few in full to set tau.
        Plain (unscreened) steps take the `batch` highest bounds first, then every stale candidate whose bound
        reaches the best float64 key found (each must be evaluated unless a later one raises that key)."""
        cand = F[(self.fresh[F] != step) & (self.ub[F] > -math.inf)]
        if not self.switch.screening:  # every stale bound at or above the best key must be evaluated anyway
            size = self.batch if self.tau == -math.inf else max(1, min(int((self.ub[cand] >= self.tau).sum()),
                                                                       self.max_batch))
        if size < len(cand):
            cand = cand[np.argpartition(-self.ub[cand], size - 1)[:size]]
        self.screened_bounds.append(self.ub[cand].copy())
        # what the plain lazy greedy would hold as this candidate's bound: its last float32 (or float64) gain, a
        # stale gain (not `ub`, which gradient bounds may have brought far below it), else the bound
        g = self.g32[cand]
        known = np.isfinite(g)
        self.screened_estimates.append(np.where(known, quantize(np.where(known, g, 0.0) / self.div[cand]),
                                                self.ub[cand]))
        self.stats["rounds"] += 1
        if not self.switch.screening:
            self._plain(cand, step)
            return
        if self.tau == -math.inf:
            head = np.argsort(-self.ub[cand], kind="stable")[:8]
            self.tau = self._evaluate(cand[head], step, -math.inf)
            cand = np.delete(cand, head)
        self.tau = self._evaluate(cand, step, self.tau)

    def _plain(self, cand: np.ndarray, step: int) -> None:
        """The plain lazy greedy's block: float64 gains of `cand`, no screen."""
        t0 = time.perf_counter()
        g64 = self.obj.gains(cand)
        self.switch.timed_float64(time.perf_counter() - t0, len(cand))
        keys = quantize(g64 / self.div[cand])
        self.ub[cand] = self.lb[cand] = keys
        self.g32[cand], self.eps[cand] = g64, 0.0
        self.fresh[cand], self.exact[cand] = step, True
        if len(cand):
            self.tau = max(self.tau, float(keys.max()))

    def next_pick(self, step: int, remaining: int | None) -> int | None:
        """The naive greedy's pick at this step (best exact key, lowest index on ties), or None."""
        if remaining is not None:
            self.affordable = self.costs <= remaining
            F = self.front.idx
            self.ub[F[~self.affordable[F]]] = -math.inf  # can never fit again: the budget only shrinks
        if step > 0:
            self.tau = -math.inf
        size, self.screened_bounds, self.screened_estimates = self.last_block, [], []
        started = time.perf_counter()
        self.switch.screen_at(step)
        while True:
            F = self.front.idx
            u = self.ub[F]
            j = int(np.argmax(u)) if len(F) else 0
            if not len(F) or u[j] <= self.front.outside:  # the front no longer decides: take the next best
                if not len(F) and self.front.outside == -math.inf and step > 0:
                    return None
                self.front.refill(self.ub, self.affordable)
                if not len(self.front.idx):
                    return None
                continue
            top = int(F[j])
            if u[j] == -math.inf:
                return None
            if self.fresh[top] == step and self.exact[top]:
                # next step's first block: as many as had to be screened here (bounds at least the pick's key)
                needed = sum(int((b >= u[j]).sum()) for b in self.screened_bounds)
                self.last_block = int(np.clip(needed + needed // 4, self.batch, self.max_batch))
                plain = sum(int((e >= u[j]).sum()) for e in self.screened_estimates)
                self.switch.observe(step, time.perf_counter() - started, plain)
                return top
            if self.fresh[top] == step:
                self._recheck(F, step)
            else:
                self._block(F, step, size)
                size = min(2 * size, self.max_batch)


def lazy_greedy(obj: LogDetObjective, k: int | None = None, token_budget: int | None = None,
                costs=None, rule: str = "ratio", batch: int = 64, max_batch: int = 8192,
                front: int = 1 << 16, screen: str = "auto") -> GreedyResult:
    """Lazy greedy (Minoux 1978) with float32 screening and float64 decisions: exactly the naive greedy's picks.

    Every candidate keeps an upper bound of its exact key (stale gains only shrink: submodularity). A step
    screens blocks of the highest-bound stale candidates in float32: a trace (Jensen) bound first, which drops
    most of them at half the cost, then the float32 gain with a rounding margin for the rest; the float32
    candidates that can still win are re-evaluated in float64, and a candidate is picked only when its float64
    key is at least every other bound (ties: lowest index, as in naive greedy). Block sizes follow the previous
    step's work (`batch` .. `max_batch`); all bookkeeping is on numpy arrays over the `front` best bounds.

    The float32 screen must pay for itself: `screen="auto"` measures each screened step against what the plain
    lazy greedy would have spent (`ScreenSwitch`) and evaluates plainly in float64 while the screen costs more
    (on data whose rounding margins are wide next to the spread of the gains); "always" and "never" fix the
    mode. Kept float64 Grams (`core.fisher_incremental`, wide features) are always used when present.
    """
    t0 = time.perf_counter()
    rule = check_rule(rule, token_budget)
    if screen not in ("auto", "always", "never"):
        raise ValueError(f"screen must be 'auto', 'always' or 'never', got '{screen}'")
    k, costs, fits = greedy_setup(obj, k, token_budget, costs)
    switch = ScreenSwitch(enabled=screen != "always" and obj.incremental is None)
    if screen == "never" and obj.incremental is None:
        switch.plain_until = obj.n + 1
    st = _LazyState(obj, costs, rule, fits, front, batch, max_batch, switch)
    picks, gains, used = lazy_loop(obj, st, k, costs, token_budget)
    info = {"rule": rule, "tokens": used, "screens": obj.n_screens, **st.stats, **switch.stats}
    return GreedyResult(picks, gains, obj.value(), obj.initial_value(), obj.n_evals,
                        time.perf_counter() - t0, "lazy", info)


def stochastic_greedy(obj: LogDetObjective, k: int | None = None, token_budget: int | None = None,
                      costs=None, rule: str = "ratio", epsilon: float = 0.1, seed: int = 0) -> GreedyResult:
    """Stochastic greedy (Mirzasoleiman et al., 2015): each step evaluates a seeded random sample of
    s = ceil((N / K) * ln(1 / epsilon)) remaining candidates and takes its best (lowest index on ties);
    expected approximation 1 - 1/e - epsilon. With only a token budget, K is estimated as
    token_budget / mean cost of the fitting candidates."""
    if not 0 < epsilon < 1:
        raise ValueError(f"epsilon must be in (0, 1), got {epsilon}")
    t0 = time.perf_counter()
    rule = check_rule(rule, token_budget)
    k, costs, fits = greedy_setup(obj, k, token_budget, costs)
    rng = np.random.default_rng(seed)
    k_est = k
    if token_budget is not None and fits.any():
        k_est = min(k, max(1, int(token_budget / max(costs[fits].mean(), 1))))
    s = max(1, int(math.ceil(obj.n / max(k_est, 1) * math.log(1.0 / epsilon))))

    def sample(remaining: np.ndarray) -> np.ndarray:
        if s < len(remaining):
            return np.sort(rng.choice(len(remaining), size=s, replace=False))
        return np.arange(len(remaining))

    picks, gains, used = _sampled_greedy(obj, k, token_budget, costs, rule, fits, sample)
    return GreedyResult(picks, gains, obj.value(), obj.initial_value(), obj.n_evals,
                        time.perf_counter() - t0, "stochastic",
                        {"rule": rule, "tokens": used, "sample_size": s, "epsilon": epsilon, "seed": seed})


ALGORITHMS = {"lazy": lazy_greedy, "naive": naive_greedy, "stochastic": stochastic_greedy}


def run_greedy(features, offsets, lam: float = 1.0, algorithm: str = "lazy", k: int | None = None,
               token_budget: int | None = None, costs=None, seed: int = 0, epsilon: float = 0.1,
               rule: str = "celf", device=None) -> GreedyResult:
    """`rule="celf"` under a token budget runs the cost-benefit (ratio) greedy and the plain gain greedy and keeps
    the higher objective (Leskovec et al., KDD 2007): ratio greedy alone can be arbitrarily bad when one long,
    very informative sentence loses to many short ones; the better of the two is within (1 - 1/e) / 2 of
    the optimum."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm '{algorithm}' is unknown; choose one of {sorted(ALGORITHMS)}")
    if rule == "celf" and token_budget is not None:
        runs = []
        for n, r in enumerate(("ratio", "gain"), 1):
            with greedy_section(f"greedy, CELF pass {n} of 2 ({r} rule)"):
                runs.append(run_greedy(features, offsets, lam, algorithm, k, token_budget, costs, seed, epsilon, r,
                                       device))
        best = max(runs, key=lambda r: (r.objective, r.info["rule"] == "ratio"))
        best.info.update(rule="celf", celf_winner=best.info["rule"],
                         celf_objectives={r.info["rule"]: r.objective for r in runs})
        best.evaluations = sum(r.evaluations for r in runs)
        best.seconds = sum(r.seconds for r in runs)
        return best
    kwargs = {"k": k, "token_budget": token_budget, "costs": costs, "rule": "ratio" if rule == "celf" else rule}
    kind = pick_device(device).type
    if algorithm == "lazy" and kind == "cuda":
        return device_lazy_greedy(DeviceLogDet(features, offsets, lam=lam, device=device), **kwargs)
    if algorithm == "stochastic":
        kwargs.update(epsilon=epsilon, seed=seed)
    # on the CPU, blocks of 256 rows: a second thread gains nothing and its pools contend (`one_thread`)
    with one_thread() if kind == "cpu" else contextlib.nullcontext():
        return ALGORITHMS[algorithm](LogDetObjective(features, offsets, lam=lam, device=device), **kwargs)


def select_from_features(features, offsets, budget, lam: float = 1.0, algorithm: str = "lazy", seed: int = 0,
                         epsilon: float = 0.1, rule: str = "celf", device=None, costs=None) -> GreedyResult:
    """FisherSFT on in-memory features under a budget (anything with `examples`, `tokens` and `check(n, tokens)`,
    such as the selectors' `Budget`). A sentence costs `costs` (the loss tokens its record trains on) or, without
    them, its feature rows (the same number unless `source.too_long: keep` measured a record past max_length).
    The greedy's own result, its `info` holding what a selection manifest records (algorithm, lam, n, d, tokens,
    evaluations, ...)."""
    features, offsets = check_features(features, offsets)
    lengths = np.diff(offsets)
    costs = lengths if costs is None else np.asarray(costs, dtype=np.int64)
    budget.check(len(lengths), int(costs.sum()))
    res = run_greedy(features, offsets, lam=lam, algorithm=algorithm, k=budget.examples,
                     token_budget=budget.tokens, costs=costs, seed=seed, epsilon=epsilon, rule=rule,
                     device=device)
    res.info = {"algorithm": res.algorithm, "lam": lam, "evaluations": res.evaluations,
                "seconds": round(res.seconds, 3), "n": len(lengths), "d": int(features.shape[1]),
                "objective_initial": res.initial, "tokens": int(costs[res.picks].sum()) if res.picks else 0,
                **res.info}
    return res
