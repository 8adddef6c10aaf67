"""FisherSFT math (Deb et al., ICML 2025): a log-det objective over sentences and greedy optimizers for it.

Plain torch/numpy, no Prefect. The objective and the optimizers are separate (submodlib style): an optimizer
only needs `n`, `gains(candidates)`, `add(i)` and `value()`.

Model. Every loss token j of sentence i is a multinomial logistic regression on the pre-logit hidden state
x_ij in R^d that predicts it. Up to the softmax curvature, the Fisher information of the picked set S is
A(S) = lam*I + sum_{i in S} X_i^T X_i (X_i = the L_i x d matrix of sentence i's token features), and
FisherSFT greedily maximises f(S) = log det A(S). The marginal gain of sentence i given A is

    f(S + i) - f(S) = log det(I_L + X_i A^-1 X_i^T) = log det(I_d + A^-1/2 X_i^T X_i A^-1/2),

which is monotone and submodular in S, so the lazy greedy (stale gains are upper bounds) picks exactly what
the naive greedy picks.

Numerics. A and A^-1 are float64. `add(i)` updates A^-1 by a rank-L_i Woodbury step (when L_i < d, otherwise
it refactors A, which is cheaper then) and refactors A^-1 from A every `refresh_every` picks to bound drift.
Gains of many candidates are evaluated in one batched op: features of B sentences are gathered into a
zero-padded [B, L, d] tensor, multiplied by U (A^-1 = U U^T), and the log det of the B small Gram matrices is
read off a batched Cholesky. Zero padding rows contribute identity rows, so they do not change a gain.
Sentences with L_i <= d use the L x L Gram, longer ones the d x d Gram.

Ties. Gains are compared after rounding to a grid of 2^-36 (~1.5e-11): two sentences whose gains differ by
float noise (e.g. exact duplicates evaluated in different batches) are a tie, and every optimizer breaks ties
by the lowest index, so naive and lazy greedy agree pick for pick.
"""
from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

QUANTUM = 2.0 ** -36


def pick_device(device: str | torch.device | None = None) -> torch.device:
    from sftcurate.infra.models import resolve_device

    return device if isinstance(device, torch.device) else torch.device(resolve_device(device))


def quantize(values: np.ndarray) -> np.ndarray:
    """Comparison keys: gains rounded to a fixed grid so float noise never decides a pick."""
    return np.round(np.asarray(values, dtype=np.float64) / QUANTUM) * QUANTUM


def check_features(features, offsets, where: str = "features") -> tuple[np.ndarray | torch.Tensor, np.ndarray]:
    """Shape/monotonicity/finiteness checks for in-memory inputs (files go through the data contract)."""
    offsets = np.asarray(offsets)
    if getattr(features, "ndim", None) != 2:
        raise ValueError(f"{where}: 'features' must be 2-D [tokens, d], got shape {tuple(features.shape)}")
    if offsets.ndim != 1 or offsets.size < 1 or offsets[0] != 0:
        raise ValueError(f"{where}: 'offsets' must be 1-D and start at 0")
    if (np.diff(offsets) < 0).any():
        bad = int(np.argmax(np.diff(offsets) < 0))
        raise ValueError(f"{where}: 'offsets' not monotone at sentence {bad}")
    if int(offsets[-1]) != features.shape[0]:
        raise ValueError(f"{where}: 'offsets' ends at {int(offsets[-1])} but 'features' has {features.shape[0]} rows")
    return features, offsets.astype(np.int64)


class LogDetObjective:
    """f(S) = log det(lam*I + sum_{i in S} X_i^T X_i) over sentences given as (features [T, d], offsets [N+1])."""

    def __init__(self, features, offsets, lam: float = 1.0, device=None, dtype: torch.dtype = torch.float64,
                 refresh_every: int = 64, batch_rows: int = 1 << 16):
        if lam <= 0:
            raise ValueError(f"lam must be > 0, got {lam}")
        features, offsets = check_features(features, offsets)
        self.device = pick_device(device)
        self.dtype = dtype
        self.lam = float(lam)
        feats = torch.as_tensor(features)
        if feats.dtype not in (torch.float32, torch.float64):
            feats = feats.float()
        self.X = feats.to(self.device)  # storage dtype kept (float32 halves memory); batches are upcast
        self.offsets = offsets
        self.lengths = np.diff(offsets)
        self.n = len(self.lengths)
        self.d = int(self.X.shape[1])
        self.refresh_every = refresh_every
        self.batch_rows = batch_rows
        eye = torch.eye(self.d, dtype=dtype, device=self.device)
        self.A = self.lam * eye
        self.Ainv = eye / self.lam
        self.U: torch.Tensor | None = None  # None: A = lam*I, so U = I/sqrt(lam) is a scale
        self.picked: list[int] = []
        self.n_evals = 0

    # ------------------------------------------------------------------ evaluation
    def _gather(self, cand: np.ndarray, width: int) -> torch.Tensor:
        """Zero-padded [B, width, d] float64 features of the sentences `cand`."""
        lens = self.lengths[cand]
        ar = np.arange(width)
        mask = ar[None, :] < lens[:, None]
        idx = np.where(mask, self.offsets[cand][:, None] + ar[None, :], 0)
        idx_t = torch.from_numpy(idx).to(self.device)
        out = self.X[idx_t].to(self.dtype)
        if not mask.all():
            out = out * torch.from_numpy(mask).to(self.device, self.dtype).unsqueeze(-1)
        return out

    def _batch_gains(self, cand: np.ndarray, form: str) -> torch.Tensor:
        width = int(self.lengths[cand].max()) if len(cand) else 0
        if width == 0:
            return torch.zeros(len(cand), dtype=self.dtype, device=self.device)
        Y = self._gather(cand, width)
        B = Y.shape[0]
        if self.U is None:
            Y = Y * (1.0 / math.sqrt(self.lam))
        else:
            Y = (Y.reshape(-1, self.d) @ self.U).reshape(B, width, self.d)
        if form == "L":
            G = Y @ Y.transpose(1, 2)
        else:
            G = Y.transpose(1, 2) @ Y
        G.diagonal(dim1=1, dim2=2).add_(1.0)
        chol, info = torch.linalg.cholesky_ex(G)
        out = 2.0 * chol.diagonal(dim1=1, dim2=2).log().sum(-1)
        bad = info != 0
        if bool(bad.any()):  # not PD by rounding: fall back to slogdet for those few
            out[bad] = torch.linalg.slogdet(G[bad])[1]
        return out

    def gains(self, candidates) -> np.ndarray:
        """Marginal gains of many sentences given the current A, in batches grouped by length."""
        cand = np.asarray(candidates, dtype=np.int64).reshape(-1)
        out = np.zeros(len(cand), dtype=np.float64)
        if len(cand) == 0:
            return out
        self.n_evals += len(cand)
        lens = self.lengths[cand]
        order = np.argsort(lens, kind="stable")
        for form, sel in (("L", order[lens[order] <= self.d]), ("d", order[lens[order] > self.d])):
            start = 0
            while start < len(sel):
                # sorted by length, so the last sentence of a chunk is its longest: keep width * size <= batch_rows
                stop = min(len(sel), start + max(1, self.batch_rows // max(int(lens[sel[start]]), 1)))
                while stop > start + 1 and int(lens[sel[stop - 1]]) * (stop - start) > self.batch_rows:
                    stop = start + max(1, self.batch_rows // int(lens[sel[stop - 1]]))
                chunk = sel[start:stop]
                out[chunk] = self._batch_gains(cand[chunk], form).cpu().numpy()
                start = stop
        return out

    def gain(self, i: int) -> float:
        return float(self.gains([i])[0])

    # ------------------------------------------------------------------ update
    def _refactor(self) -> None:
        chol = torch.linalg.cholesky(self.A)
        self.Ainv = torch.cholesky_inverse(chol)

    def add(self, i: int) -> float:
        """Add sentence i to the set; returns its gain log det(I + X_i A^-1 X_i^T) before the update."""
        i = int(i)
        L = int(self.lengths[i])
        self.picked.append(i)
        if L == 0:
            return 0.0
        Xi = self.X[int(self.offsets[i]):int(self.offsets[i + 1])].to(self.dtype)
        Z = Xi @ self.Ainv                                   # [L, d]
        S = Xi @ Z.T                                         # X A^-1 X^T
        S.diagonal().add_(1.0)
        chol_S = torch.linalg.cholesky(S) if L <= self.d else None
        if chol_S is not None:
            gain = float(2.0 * chol_S.diagonal().log().sum())
        else:
            gain = float(torch.linalg.slogdet(S)[1])
        self.A = self.A + Xi.T @ Xi
        if L < self.d and len(self.picked) % self.refresh_every != 0:
            # Woodbury: (A + X^T X)^-1 = A^-1 - A^-1 X^T (I + X A^-1 X^T)^-1 X A^-1
            W = torch.cholesky_solve(Z, chol_S)              # S^-1 Z
            self.Ainv = self.Ainv - Z.T @ W
            self.Ainv = 0.5 * (self.Ainv + self.Ainv.T)
        else:
            self._refactor()
        self.U = torch.linalg.cholesky(self.Ainv)
        return gain

    def value(self) -> float:
        """log det A of the current set, computed directly from A."""
        return float(torch.linalg.slogdet(self.A)[1])

    def initial_value(self) -> float:
        return self.d * math.log(self.lam)


def direct_logdet(features, offsets, picks, lam: float) -> float:
    """Reference: log det(lam*I + sum_{i in picks} X_i^T X_i) in float64, no incremental updates."""
    X = torch.as_tensor(np.asarray(features), dtype=torch.float64)
    A = lam * torch.eye(X.shape[1], dtype=torch.float64)
    for i in picks:
        Xi = X[int(offsets[i]):int(offsets[i + 1])]
        A += Xi.T @ Xi
    return float(torch.logdet(A))


# ====================================================================== optimizers

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


def _setup(obj, k, token_budget, costs):
    n = obj.n
    costs = np.asarray(obj.lengths if costs is None else costs, dtype=np.int64)
    if k is None and token_budget is None:
        raise ValueError("set k (sentences) or token_budget (tokens)")
    k = n if k is None else min(int(k), n)
    fits = np.ones(n, dtype=bool) if token_budget is None else costs <= token_budget
    return k, costs, fits


def _keys(gains: np.ndarray, cand: np.ndarray, costs: np.ndarray, rule: str) -> np.ndarray:
    if rule == "ratio":
        return quantize(gains / np.maximum(costs[cand], 1))
    return quantize(gains)


def _check_rule(rule: str, token_budget) -> str:
    if rule not in ("gain", "ratio"):
        raise ValueError(f"rule must be 'gain' or 'ratio', got '{rule}'")
    return rule if token_budget is not None else "gain"


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
    return picks, gains, used


def naive_greedy(obj: LogDetObjective, k: int | None = None, token_budget: int | None = None,
                 costs=None, rule: str = "ratio") -> GreedyResult:
    """Re-evaluates every remaining candidate at every step (batched), picks the best key, lowest index on ties."""
    t0 = time.perf_counter()
    rule = _check_rule(rule, token_budget)
    k, costs, fits = _setup(obj, k, token_budget, costs)
    picks, gains, used = _sampled_greedy(obj, k, token_budget, costs, rule, fits, lambda rem: np.arange(len(rem)))
    return GreedyResult(picks, gains, obj.value(), obj.initial_value(), obj.n_evals,
                        time.perf_counter() - t0, "naive", {"rule": rule, "tokens": used})


def lazy_greedy(obj: LogDetObjective, k: int | None = None, token_budget: int | None = None,
                costs=None, rule: str = "ratio", batch: int = 8, max_batch: int = 1024) -> GreedyResult:
    """Lazy greedy (Minoux 1978) with a max-heap of stale upper bounds, re-evaluated in batches.

    The heap holds (-key, index). Each step: if the top entry was evaluated against the current set, it is at
    least every other entry's upper bound (ties: lowest index, the heap order), so it is exactly the naive
    greedy's pick. Otherwise the top `b` stale entries are popped, re-evaluated in one batched call and pushed
    back; `b` doubles on every failed round of the same step (8, 16, ..., max_batch). Evaluating more than
    strictly needed never changes the pick: fresh gains are still valid upper bounds.
    """
    t0 = time.perf_counter()
    rule = _check_rule(rule, token_budget)
    k, costs, fits = _setup(obj, k, token_budget, costs)
    cand = np.flatnonzero(fits)
    keys0 = _keys(obj.gains(cand), cand, costs, rule)
    heap = list(zip((-keys0).tolist(), cand.tolist()))
    heapq.heapify(heap)
    stamp = np.full(obj.n, 0, dtype=np.int64)  # step at which the entry's key was computed
    used, picks, gains, rounds = 0, [], [], 0
    while heap and len(picks) < k:
        step = len(picks)
        b = batch
        while heap:
            negkey, i = heap[0]
            if token_budget is not None and costs[i] > token_budget - used:
                heapq.heappop(heap)  # can never fit again: the remaining budget only shrinks
                continue
            if stamp[i] == step:
                break
            popped_fresh, stale = [], []
            while heap and len(stale) < b:
                entry = heapq.heappop(heap)
                j = entry[1]
                if token_budget is not None and costs[j] > token_budget - used:
                    continue
                (popped_fresh if stamp[j] == step else stale).append(entry)
            idx = np.array([e[1] for e in stale], dtype=np.int64)
            new = _keys(obj.gains(idx), idx, costs, rule)
            stamp[idx] = step
            for entry in popped_fresh:
                heapq.heappush(heap, entry)
            for key, j in zip((-new).tolist(), idx.tolist()):
                heapq.heappush(heap, (key, j))
            b = min(2 * b, max_batch)
            rounds += 1
        if not heap:
            break
        _, i = heapq.heappop(heap)
        gains.append(obj.add(i))
        picks.append(i)
        used += int(costs[i])
    return GreedyResult(picks, gains, obj.value(), obj.initial_value(), obj.n_evals,
                        time.perf_counter() - t0, "lazy", {"rule": rule, "tokens": used, "rounds": rounds})


def stochastic_greedy(obj: LogDetObjective, k: int | None = None, token_budget: int | None = None,
                      costs=None, rule: str = "ratio", epsilon: float = 0.1, seed: int = 0) -> GreedyResult:
    """Stochastic greedy (Mirzasoleiman et al., 2015): each step evaluates a seeded random sample of
    s = ceil((N / K) * ln(1 / epsilon)) remaining candidates and takes its best (lowest index on ties);
    expected approximation 1 - 1/e - epsilon. With only a token budget, K is estimated as
    token_budget / mean cost of the fitting candidates."""
    if not 0 < epsilon < 1:
        raise ValueError(f"epsilon must be in (0, 1), got {epsilon}")
    t0 = time.perf_counter()
    rule = _check_rule(rule, token_budget)
    k, costs, fits = _setup(obj, k, token_budget, costs)
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
    if rule not in ("celf", "ratio", "gain"):
        raise ValueError(f"rule must be 'celf', 'ratio' or 'gain', got '{rule}'")
    if rule == "celf" and token_budget is not None:
        runs = [run_greedy(features, offsets, lam, algorithm, k, token_budget, costs, seed, epsilon, r, device)
                for r in ("ratio", "gain")]
        best = max(runs, key=lambda r: (r.objective, r.info["rule"] == "ratio"))
        best.info.update(rule="celf", celf_winner=best.info["rule"],
                         celf_objectives={r.info["rule"]: r.objective for r in runs})
        best.evaluations = sum(r.evaluations for r in runs)
        best.seconds = sum(r.seconds for r in runs)
        return best
    obj = LogDetObjective(features, offsets, lam=lam, device=device)
    kwargs = {"k": k, "token_budget": token_budget, "costs": costs, "rule": "ratio" if rule == "celf" else rule}
    if algorithm == "stochastic":
        kwargs.update(epsilon=epsilon, seed=seed)
    return ALGORITHMS[algorithm](obj, **kwargs)


def select_from_features(features, offsets, budget, lam: float = 1.0, algorithm: str = "lazy", seed: int = 0,
                         epsilon: float = 0.1, rule: str = "celf", device=None):
    """FisherSFT on in-memory features under a `Budget` (examples and/or tokens; a sentence costs its rows)."""
    from sftcurate.core.selectors.base import SelectionResult

    features, offsets = check_features(features, offsets)
    lengths = np.diff(offsets)
    budget.check(len(lengths), int(offsets[-1]))
    res = run_greedy(features, offsets, lam=lam, algorithm=algorithm, k=budget.examples,
                     token_budget=budget.tokens, costs=lengths, seed=seed, epsilon=epsilon, rule=rule,
                     device=device)
    info = {"algorithm": res.algorithm, "lam": lam, "evaluations": res.evaluations, "seconds": round(res.seconds, 3),
            "n": len(lengths), "d": int(features.shape[1]), "objective_initial": res.initial,
            "tokens": int(lengths[res.picks].sum()) if res.picks else 0, **res.info}
    return SelectionResult(indices=res.picks, gains=res.gains, objective=res.objective, info=info)
