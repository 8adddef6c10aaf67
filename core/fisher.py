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

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from sftcurate.core.fisher_incremental import kept_grams, logdets
from sftcurate.infra import progress

QUANTUM = 2.0 ** -36
EPS32 = float(np.finfo(np.float32).eps)


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


class ShardedRows:
    """Feature rows [T, d] held as consecutive blocks (memory-mapped shard files, or one array), read in place.

    `take(idx)` gathers rows by global index (any shape) without ever concatenating the blocks, so a pool whose
    features do not fit in memory twice is read straight from its shard files."""

    def __init__(self, blocks: list, starts: np.ndarray):
        self.blocks = blocks
        self.starts = np.asarray(starts, dtype=np.int64)   # first global row of every block
        d = {int(b.shape[1]) for b in blocks}
        if len(d) != 1:
            raise ValueError(f"feature blocks disagree on d ({sorted(d)})")
        self.shape = (int(self.starts[-1]) + int(blocks[-1].shape[0]), d.pop())
        self.ndim = 2
        self.dtype = blocks[0].dtype

    def take(self, idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        if len(self.blocks) == 1:
            return self.blocks[0][idx]
        out = np.empty(idx.shape + (self.shape[1],), dtype=self.dtype)
        which = np.searchsorted(self.starts, idx, side="right") - 1
        for b in np.unique(which):
            m = which == b
            out[m] = self.blocks[b][idx[m] - self.starts[b]]
        return out

    def chunks(self, rows: int = 1 << 18):
        """(global start, block slice) pieces of at most `rows` rows, in order: for one streaming pass."""
        for start, block in zip(self.starts.tolist(), self.blocks):
            for lo in range(0, block.shape[0], rows):
                yield start + lo, block[lo:lo + rows]

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        """Rows by a slice, an index or an index array (a copy of just those rows), as a numpy array would."""
        if isinstance(key, tuple):
            return self[key[0]][(slice(None),) + key[1:]] if len(key) > 1 else self[key[0]]
        if isinstance(key, slice):
            return self.take(np.arange(*key.indices(self.shape[0])))
        idx = np.asarray(key, dtype=np.int64)
        return self.take(np.where(idx < 0, idx + self.shape[0], idx))

    def __array__(self, dtype=None, copy=None):
        """The rows as one in-memory array: a full copy, for callers that transform every row anyway (feature
        variants, diagnostics, tests). The greedy never calls it."""
        out = np.concatenate(self.blocks) if len(self.blocks) > 1 else np.array(self.blocks[0])
        return out if dtype is None else out.astype(dtype, copy=False)


def row_chunks(features, rows: int = 1 << 18):
    """(global start, rows) pieces of a [T, d] array or `ShardedRows`, in order, each at most `rows` rows."""
    if isinstance(features, ShardedRows):
        yield from features.chunks(rows)
        return
    for lo in range(0, features.shape[0], rows):
        yield lo, features[lo:lo + rows]


class LogDetObjective:
    """f(S) = log det(lam*I + sum_{i in S} X_i^T X_i) over sentences given as (features [T, d], offsets [N+1])."""

    def __init__(self, features, offsets, lam: float = 1.0, device=None, dtype: torch.dtype = torch.float64,
                 refresh_every: int = 64, batch_rows: int = 1 << 16, trace_cache_bytes: int = 1 << 30,
                 incremental: bool = True):
        if lam <= 0:
            raise ValueError(f"lam must be > 0, got {lam}")
        features, offsets = check_features(features, offsets)
        self.device = pick_device(device)
        self.dtype = dtype
        self.lam = float(lam)
        # Storage is never copied on the CPU: numpy arrays, memory-maps and `ShardedRows` are gathered from in
        # place, a block at a time (a 10^6-sentence pool is 8 GB of float32); tensors go to the device as before.
        self.rows: ShardedRows | None = None
        self.X: torch.Tensor | None = None
        if isinstance(features, ShardedRows):
            self.rows = features
        elif isinstance(features, np.ndarray) and self.device.type == "cpu":
            arr = features if features.dtype in (np.float32, np.float64) else features.astype(np.float32)
            self.rows = ShardedRows([arr], np.array([0], dtype=np.int64))
        else:
            feats = torch.as_tensor(features)
            if feats.dtype not in (torch.float32, torch.float64):
                feats = feats.float()
            self.X = feats.to(self.device)  # storage dtype kept (float32 halves memory); batches are upcast
        self.offsets = offsets
        self.lengths = np.diff(offsets)
        self.n = len(self.lengths)
        self.d = int(features.shape[1])
        self.refresh_every = refresh_every
        self.batch_rows = batch_rows
        eye = torch.eye(self.d, dtype=dtype, device=self.device)
        self.A = self.lam * eye
        self.Ainv = eye / self.lam
        self.U: torch.Tensor | None = None  # None: A = lam*I, so U = I/sqrt(lam) is a scale
        self.picked: list[int] = []
        self.n_evals = 0
        self.n_screens = 0              # float32 trace-bound screens (see `screen32`)
        self.ainv_bound = 1.0 / self.lam  # an upper bound on ||A^-1||_2, for the screens' error margins
        self.kappa = 4.0 * math.sqrt(self.d) + 16.0  # the screens' margin factor; widened if a recheck exceeds it
        self._U32: torch.Tensor | None = None
        self._sq_norms: np.ndarray | None = None
        self.trace_cache_bytes = trace_cache_bytes
        self._C: np.ndarray | None = None
        self.incremental = kept_grams(self) if incremental else None

    # ------------------------------------------------------------------ evaluation
    def _gather(self, cand: np.ndarray, width: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Zero-padded [B, width, d] features of the sentences `cand` (float64 unless `dtype` says otherwise)."""
        dtype = dtype or self.dtype
        lens = self.lengths[cand]
        ar = np.arange(width)
        mask = ar[None, :] < lens[:, None]
        idx = np.where(mask, self.offsets[cand][:, None] + ar[None, :], 0)
        if self.rows is not None:  # numpy / memory-mapped / sharded storage: gather on the host
            out = torch.from_numpy(np.ascontiguousarray(self.rows.take(idx))).to(self.device, dtype)
        else:
            out = self.X[torch.from_numpy(idx).to(self.device)].to(dtype)
        if not mask.all():
            out = out * torch.from_numpy(mask).to(self.device, dtype).unsqueeze(-1)
        return out

    def times_U(self, X: torch.Tensor, U: torch.Tensor | None) -> torch.Tensor:
        """[B, width, d] X_i U for A^-1 = U U^T (U None: A = lam I, a scale)."""
        if U is None:
            return X * (1.0 / math.sqrt(self.lam))
        return (X.reshape(-1, self.d) @ U).reshape(X.shape)

    def _batch_gains(self, cand: np.ndarray, form: str) -> torch.Tensor:
        width = int(self.lengths[cand].max()) if len(cand) else 0
        if width == 0:
            return torch.zeros(len(cand), dtype=self.dtype, device=self.device)
        Y = self.times_U(self._gather(cand, width), self.U)
        if form == "L":
            G = Y @ Y.transpose(1, 2)
        else:
            G = Y.transpose(1, 2) @ Y
        G.diagonal(dim1=1, dim2=2).add_(1.0)
        return logdets(G)

    def _chunks(self, cand: np.ndarray):
        """(form, positions into cand) batches grouped by length, each at most `batch_rows` padded rows."""
        lens = self.lengths[cand]
        order = np.argsort(lens, kind="stable")
        for form, sel in (("L", order[lens[order] <= self.d]), ("d", order[lens[order] > self.d])):
            start = 0
            while start < len(sel):
                # sorted by length, so the last sentence of a chunk is its longest: keep width * size <= batch_rows
                stop = min(len(sel), start + max(1, self.batch_rows // max(int(lens[sel[start]]), 1)))
                while stop > start + 1 and int(lens[sel[stop - 1]]) * (stop - start) > self.batch_rows:
                    stop = start + max(1, self.batch_rows // int(lens[sel[stop - 1]]))
                yield form, sel[start:stop]
                start = stop

    def gains(self, candidates) -> np.ndarray:
        """Marginal gains (float64) of many sentences given the current A, in batches grouped by length."""
        cand = np.asarray(candidates, dtype=np.int64).reshape(-1)
        out = np.zeros(len(cand), dtype=np.float64)
        self.n_evals += len(cand)
        for form, chunk in self._chunks(cand):
            out[chunk] = self._batch_gains(cand[chunk], form).cpu().numpy()
        return out

    # ------------------------------------------------------------------ float32 screening
    @property
    def sq_norms(self) -> np.ndarray:
        """||X_i||_F^2 of every sentence (one streaming pass, float64 sums), for the float32 error margin."""
        if self._sq_norms is None:
            T = int(self.offsets[-1])
            row = np.zeros(T + 1, dtype=np.float64)
            if self.rows is not None:
                for lo, block in self.rows.chunks():
                    b = np.asarray(block, dtype=np.float64)
                    row[lo + 1:lo + 1 + len(b)] = np.einsum("ij,ij->i", b, b)
            else:
                row[1:] = self.X.double().square().sum(1).cpu().numpy()
            cs = np.cumsum(row, out=row)
            self._sq_norms = cs[self.offsets[1:]] - cs[self.offsets[:-1]]
        return self._sq_norms

    def margin(self, cand: np.ndarray) -> np.ndarray:
        """A bound on |float32 gain - float64 gain| (and on the float32 trace's error) of each candidate.

        Rounding U and X to float32 perturbs M = X A^-1 X^T by about u * ||X||_F^2 * ||A^-1||_2 (entrywise
        relative errors, summed over d terms); the Cholesky of I + M (eigenvalues >= 1) adds about u per row.
        `kappa` (4 sqrt(d) + 16) is far above the errors measured (tests and benchmarks check the ratio) and is
        widened 4x for the rest of a run if a float64 re-check ever exceeds half of it."""
        L = self.lengths[cand]
        return self.kappa * EPS32 * (self.sq_norms[cand] * self.ainv_bound + np.sqrt(L) + 1.0)

    def screen32(self, candidates, tau: float = -math.inf, div=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Float32 evaluation in two stages: (gains32, upper bounds, margins) of `candidates`.

        Stage 1 (Y = X_i U, about half the cost) gives t = tr(X_i A^-1 X_i^T) and Jensen's bound
        gain <= r log(1 + t / r), r = min(L_i, d) (log det(I + M) = sum of log(1 + eigenvalue) over at most r
        eigenvalues, concave). Only candidates whose bound key (bound / div, quantized) reaches `tau` get stage 2
        (Gram + Cholesky): gains32 is NaN for the others. Upper bounds are valid for the float64 gain (margins
        added) and stay valid as A grows (both the gain and t only shrink)."""
        cand = np.asarray(candidates, dtype=np.int64).reshape(-1)
        if self.incremental is not None:  # wide features: float64 Grams kept up to date, every gain known
            g, ub, eps = self.incremental.screen(cand)
            self.n_screens += len(cand)
            return g, ub, eps
        div = np.ones(len(cand)) if div is None else np.asarray(div, dtype=np.float64)
        g = np.full(len(cand), np.nan)
        ub = np.zeros(len(cand))
        eps = self.margin(cand) if len(cand) else np.zeros(0)
        for form, chunk in self._chunks(cand):
            g[chunk], ub[chunk] = self._screen_chunk(cand[chunk], form, eps[chunk], tau, div[chunk])
        self.n_screens += len(cand)
        self.n_evals += int(np.isfinite(g).sum())
        return g, ub, eps

    def _U32_factor(self) -> torch.Tensor | None:
        if self.U is not None and self._U32 is None:
            self._U32 = self.U.to(torch.float32)
        return self._U32

    def _Y32(self, cand: np.ndarray) -> torch.Tensor:
        """[B, width, d] float32 X_i U (A^-1 = U U^T) of the sentences `cand`."""
        width = int(self.lengths[cand].max())
        return self.times_U(self._gather(cand, width, torch.float32), self._U32_factor())

    def _gains32(self, cand: np.ndarray, form: str, Y: torch.Tensor) -> np.ndarray:
        G = Y @ Y.transpose(1, 2) if form == "L" else Y.transpose(1, 2) @ Y
        G.diagonal(dim1=1, dim2=2).add_(1.0)
        chol, info = torch.linalg.cholesky_ex(G)
        g = (2.0 * chol.diagonal(dim1=1, dim2=2).log().sum(-1)).double().cpu().numpy()
        bad = (info != 0).cpu().numpy()
        if bad.any():  # float32 rounding broke positive definiteness: take float64 for those few
            g[bad] = self._batch_gains(cand[bad], form).cpu().numpy()
        return g

    def _screen_chunk(self, cand, form, eps, tau, div) -> tuple[np.ndarray, np.ndarray]:
        lens = self.lengths[cand]
        if not len(cand) or int(lens.max()) == 0:
            return np.zeros(len(cand)), eps.copy()
        C = self._trace_cache()
        Y = None
        if C is not None:  # t = <A^-1, X_i^T X_i> from the cached packed Grams: d^2/2 work, not L d^2
            t = C[cand] @ self._packed_ainv().astype(np.float32)
            # float32 storage (built from float32 products) and a float32 dot over p = d(d+1)/2 terms: each
            # perturbs t by at most (L resp. p/8 blocked partial sums) * u * ||A^-1||_Gershgorin * ||X_i||_F^2
            p = C.shape[1]
            eps = eps + EPS32 * (p / 8 + lens) * self.sq_norms[cand] * self.ainv_bound
        else:
            Y = self._Y32(cand)
            t = Y.square().sum((1, 2)).double().cpu().numpy()
        r = np.maximum(np.minimum(lens, self.d), 1)
        ub = r * np.log1p(np.maximum(t, 0.0) / r) + eps
        need = quantize(ub / div) >= tau
        g = np.full(len(cand), np.nan)
        if need.any():
            pos = np.flatnonzero(need)
            Yn = self._Y32(cand[pos]) if Y is None else Y[torch.from_numpy(pos).to(self.device)]
            g[pos] = self._gains32(cand[pos], form, Yn)
            ub[pos] = np.minimum(ub[pos], g[pos] + eps[pos])
        return g, ub

    def _packed_ainv(self) -> np.ndarray:
        iu = np.triu_indices(self.d)
        return self.Ainv.cpu().numpy()[iu]

    def _trace_cache(self) -> np.ndarray | None:
        """Packed upper triangles of every X_i^T X_i (off-diagonals doubled), float32 [N, d(d+1)/2], built once
        when they fit in `trace_cache_bytes`: then a trace screen reads d(d+1)/2 numbers instead of computing
        X_i U. Storing C in float32 perturbs t by at most u ||A^-1||_2-Gershgorin ||X_i||_F^2, inside `margin`."""
        p = self.d * (self.d + 1) // 2
        if self._C is not None or self.n * p * 4 > self.trace_cache_bytes or self.device.type != "cpu":
            return self._C
        iu = np.triu_indices(self.d)
        weight = torch.from_numpy(np.where(iu[0] == iu[1], 1.0, 2.0)).to(torch.float32)
        C = np.empty((self.n, p), dtype=np.float32)
        for form, chunk in self._chunks(np.arange(self.n)):
            cand = np.arange(self.n)[chunk]
            if int(self.lengths[cand].max()) == 0:
                C[cand] = 0.0
                continue
            X = self._gather(cand, int(self.lengths[cand].max()), torch.float32)
            C[cand] = ((X.transpose(1, 2) @ X)[:, iu[0], iu[1]] * weight).numpy()
        self._C = C
        return C

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
        Xi = self._gather(np.array([i]), L)[0]
        Z = Xi @ self.Ainv                                   # [L, d]
        S = Xi @ Z.T                                         # X A^-1 X^T
        S.diagonal().add_(1.0)
        chol_S = torch.linalg.cholesky(S) if L <= self.d else None
        if chol_S is not None:
            gain = float(2.0 * chol_S.diagonal().log().sum())
        else:
            gain = float(torch.linalg.slogdet(S)[1])
        if self.incremental is not None:
            self.incremental.record(i, chol_S, Z)
        self.A = self.A + Xi.T @ Xi
        if L < self.d and len(self.picked) % self.refresh_every != 0:
            # Woodbury: (A + X^T X)^-1 = A^-1 - A^-1 X^T (I + X A^-1 X^T)^-1 X A^-1
            W = torch.cholesky_solve(Z, chol_S)              # S^-1 Z
            self.Ainv = self.Ainv - Z.T @ W
            self.Ainv = 0.5 * (self.Ainv + self.Ainv.T)
        else:
            self._refactor()
        self.U = torch.linalg.cholesky(self.Ainv)
        self._U32 = None
        # Gershgorin: ||A^-1||_2 <= max absolute row sum (d^2 work, a bound, unlike a power iteration)
        self.ainv_bound = min(1.0 / self.lam, float(self.Ainv.abs().sum(1).max()))
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


def report_pick(n_picks: int, k: int, used: int, token_budget: int | None) -> None:
    """Progress of a greedy: tokens spent of a token budget, else picks of k."""
    if token_budget is not None:
        progress.step("greedy", min(used, token_budget), token_budget, unit="tokens")
    else:
        progress.step("greedy", n_picks, k, unit="picks")


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
    rule = _check_rule(rule, token_budget)
    k, costs, fits = _setup(obj, k, token_budget, costs)
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


class _LazyState:
    """Upper/lower bound keys of every candidate and what is known about each at the current step.

    ub: an upper bound of the candidate's exact (float64, quantized) key: a stale key, a Jensen trace bound or a
    float32 gain plus its margin. At the current step a candidate may be `fresh` (float32 gain known, lb a lower
    bound of the key) and then `exact` (float64 key known, ub == lb == key)."""

    def __init__(self, obj: LogDetObjective, costs: np.ndarray, rule: str, fits: np.ndarray, front: int,
                 batch: int, max_batch: int):
        n = obj.n
        self.obj, self.costs, self.batch, self.max_batch = obj, costs, batch, max_batch
        self.div = np.maximum(costs, 1).astype(np.float64) if rule == "ratio" else np.ones(n)
        self.ub = np.where(fits, math.inf, -math.inf)
        self.lb = np.full(n, -math.inf)
        self.g32 = np.full(n, np.nan)
        self.eps = np.zeros(n)
        self.fresh = np.full(n, -1, dtype=np.int64)
        self.exact = np.zeros(n, dtype=bool)
        self.affordable: np.ndarray | None = None
        self.front = _Front(front)
        self.tau = self._evaluate(np.flatnonzero(fits), 0, -math.inf)  # every gain at A = lam I, in float32
        self.last_block = batch
        self.screened_bounds: list[np.ndarray] = []
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
        g64 = self.obj.gains(idx)
        ratio = np.abs(g64 - self.g32[idx]) / np.maximum(self.eps[idx], 1e-300)
        self.stats["max_error_over_margin"] = max(self.stats["max_error_over_margin"], float(ratio.max()))
        if (ratio > 0.5).any():  # closer to the margin than ever measured: widen it for the rest of the run
            self.stats["margin_violations"] += int((ratio > 0.5).sum())
            self.obj.kappa *= 4.0
        keys = quantize(g64 / self.div[idx])
        self.ub[idx] = self.lb[idx] = keys
        self.exact[idx] = True
        self.tau = max(self.tau, float(keys.max()))
        self.stats["rechecks"] += len(idx)

    def _block(self, F: np.ndarray, step: int, size: int) -> None:
        """Screen the `size` stale candidates with the highest bounds; the first few in full to set tau."""
        cand = F[(self.fresh[F] != step) & (self.ub[F] > -math.inf)]
        if size < len(cand):
            cand = cand[np.argpartition(-self.ub[cand], size - 1)[:size]]
        self.screened_bounds.append(self.ub[cand].copy())
        if self.tau == -math.inf:
            head = np.argsort(-self.ub[cand], kind="stable")[:8]
            self.tau = self._evaluate(cand[head], step, -math.inf)
            cand = np.delete(cand, head)
        self.tau = self._evaluate(cand, step, self.tau)
        self.stats["rounds"] += 1

    def next_pick(self, step: int, remaining: int | None) -> int | None:
        """The naive greedy's pick at this step (best exact key, lowest index on ties), or None."""
        if remaining is not None:
            self.affordable = self.costs <= remaining
            F = self.front.idx
            self.ub[F[~self.affordable[F]]] = -math.inf  # can never fit again: the budget only shrinks
        if step > 0:
            self.tau = -math.inf
        size, self.screened_bounds = self.last_block, []
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
                return top
            if self.fresh[top] == step:
                self._recheck(F, step)
            else:
                self._block(F, step, size)
                size = min(2 * size, self.max_batch)


def lazy_greedy(obj: LogDetObjective, k: int | None = None, token_budget: int | None = None,
                costs=None, rule: str = "ratio", batch: int = 64, max_batch: int = 8192,
                front: int = 1 << 16) -> GreedyResult:
    """Lazy greedy (Minoux 1978) with float32 screening and float64 decisions: exactly the naive greedy's picks.

    Every candidate keeps an upper bound of its exact key (stale gains only shrink: submodularity). A step
    screens blocks of the highest-bound stale candidates in float32: a trace (Jensen) bound first, which drops
    most of them at half the cost, then the float32 gain with a rounding margin for the rest; the float32
    candidates that can still win are re-evaluated in float64, and a candidate is picked only when its float64
    key is at least every other bound (ties: lowest index, as in naive greedy). Block sizes follow the previous
    step's work (`batch` .. `max_batch`); all bookkeeping is on numpy arrays over the `front` best bounds.
    """
    t0 = time.perf_counter()
    rule = _check_rule(rule, token_budget)
    k, costs, fits = _setup(obj, k, token_budget, costs)
    st = _LazyState(obj, costs, rule, fits, front, batch, max_batch)
    used, picks, gains = 0, [], []
    while len(picks) < k:
        i = st.next_pick(len(picks), None if token_budget is None else token_budget - used)
        if i is None:
            break
        gains.append(obj.add(i))
        picks.append(i)
        used += int(costs[i])
        st.ub[i] = -math.inf
        report_pick(len(picks), k, used, token_budget)
    info = {"rule": rule, "tokens": used, "screens": obj.n_screens, **st.stats}
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
