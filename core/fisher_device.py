"""FisherSFT's lazy greedy with its rounds on the device (a GPU): the naive greedy's picks, pick for pick.

The CPU lazy greedy (`core.fisher_greedy.lazy_greedy`) keeps its bounds in numpy and screens in float32 blocks:
on a GPU each of its many small rounds waits on the host, so it ran only 2.7x faster than the naive greedy there
(docs/GPU.md). Here the state lives on the device and a round is a handful of large kernels:

- `ub`: an upper bound of every candidate's exact key (quantized gain, per token under the ratio rule). Keys
  only shrink as the set grows (submodularity), so a key computed at an earlier pick stays a bound.
- A round takes the `block` highest bounds (`torch.topk`), evaluates the stale ones among them exactly (float64,
  one padded batch: gather, X A^-1 X^T, batched Cholesky), and writes their keys back. If the best key found
  exceeds the highest bound left outside the block, it is the naive greedy's pick (the lowest index among equal
  keys); otherwise the block doubles. One small copy to the host per round decides; the next pick's block is
  sized from how many bounds the last one had to look at.
- `DeviceLogDet` keeps only A^-1 (rank-L Woodbury per pick, refactored from A every `refresh_every` picks) and
  no per-pick factorisation or host read-back: the pick's gain stays on the device until the end.

Gains use the same formula and precision as `LogDetObjective.gains` (float64 log det of I + X A^-1 X^T, the d x d
form log det(A + X^T X) - log det A for sentences longer than d), compared after `quantize`, ties to the lowest
index: tests check the picks equal the naive greedy's on ties, duplicates, uneven lengths and token budgets.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch

from sftcurate.core.feature_rows import ShardedRows, check_features
from sftcurate.core.fisher import QUANTUM, pick_device
from sftcurate.core.fisher_incremental import logdets
from sftcurate.core.greedy_base import GreedyResult, check_lam, check_rule, greedy_setup, lazy_loop


def quantize_t(values: torch.Tensor) -> torch.Tensor:
    """`core.fisher.quantize` on the device (both round half to even on float64)."""
    return torch.round(values / QUANTUM) * QUANTUM


class DeviceLogDet:
    """log det(lam I + sum of picked X_i^T X_i) with its state (A, A^-1) on `device`, float64."""

    def __init__(self, features, offsets, lam: float = 1.0, device=None, refresh_every: int = 64,
                 batch_rows: int = 1 << 17):
        lam = check_lam(lam)
        features, offsets = check_features(features, offsets)
        self.device = pick_device(device)
        self.X = _on_device(features, self.device)
        self.offsets_h = np.asarray(offsets, dtype=np.int64)
        self.lengths = np.diff(self.offsets_h)
        self.offsets = torch.as_tensor(self.offsets_h, device=self.device)
        self.lengths_t = torch.as_tensor(self.lengths, device=self.device)
        self.n, self.d, self.lam = len(self.lengths), int(self.X.shape[1]), float(lam)
        self.refresh_every, self.batch_rows = refresh_every, batch_rows
        eye = torch.eye(self.d, dtype=torch.float64, device=self.device)
        self.A, self.Ainv = lam * eye, eye / lam
        self.logdet_A = torch.tensor(self.d * math.log(lam), dtype=torch.float64, device=self.device)
        self.picked: list[int] = []
        self.n_evals = 0

    def gather(self, cand: torch.Tensor, width: int) -> torch.Tensor:
        """Zero-padded float64 [B, width, d] features of the sentences `cand` (a device index tensor)."""
        ar = torch.arange(width, device=self.device)
        mask = ar[None, :] < self.lengths_t[cand][:, None]
        rows = torch.where(mask, self.offsets[cand][:, None] + ar[None, :], 0)
        return self.X[rows].double() * mask.unsqueeze(-1)

    def gains(self, cand: torch.Tensor, width: int) -> torch.Tensor:
        """Exact float64 gains of `cand` (all at most `width` long), in chunks of `batch_rows` padded rows."""
        self.n_evals += len(cand)
        out = torch.empty(len(cand), dtype=torch.float64, device=self.device)
        step = max(1, self.batch_rows // max(width, 1))
        for lo in range(0, len(cand), step):
            X = self.gather(cand[lo:lo + step], width)
            if width <= self.d:
                G = (X @ self.Ainv) @ X.transpose(1, 2)
                G.diagonal(dim1=1, dim2=2).add_(1.0)
                out[lo:lo + step] = logdets(G)
            else:
                out[lo:lo + step] = logdets(self.A + X.transpose(1, 2) @ X) - self.logdet_A
        return out

    def add(self, i: int) -> torch.Tensor:
        """Add sentence i; returns its gain (a device scalar: no host read-back per pick)."""
        self.picked.append(int(i))
        L = int(self.lengths[i])
        if L == 0:
            return torch.zeros((), dtype=torch.float64, device=self.device)
        Xi = self.gather(torch.tensor([i], device=self.device), L)[0]
        self.A = self.A + Xi.T @ Xi
        if L < self.d and len(self.picked) % self.refresh_every != 0:
            Z = Xi @ self.Ainv                                           # [L, d]
            S = Xi @ Z.T
            S.diagonal().add_(1.0)
            chol = torch.linalg.cholesky(S)
            gain = 2.0 * chol.diagonal().log().sum()
            self.Ainv = self.Ainv - Z.T @ torch.cholesky_solve(Z, chol)   # Woodbury
            self.Ainv = 0.5 * (self.Ainv + self.Ainv.T)
            self.logdet_A = self.logdet_A + gain
            return gain
        chol = torch.linalg.cholesky(self.A)
        new = 2.0 * chol.diagonal().log().sum()
        gain, self.logdet_A = new - self.logdet_A, new
        self.Ainv = torch.cholesky_inverse(chol)
        return gain

    def value(self) -> float:
        return float(torch.linalg.slogdet(self.A)[1])

    def initial_value(self) -> float:
        return self.d * math.log(self.lam)


def _on_device(features, device: torch.device) -> torch.Tensor:
    """The features as one tensor on `device` (float32 stays float32: half the memory; gains upcast a batch).
    Sharded, memory-mapped storage is copied a block at a time, never whole on the host."""
    if isinstance(features, ShardedRows):
        out = torch.empty((features.shape[0], features.shape[1]), dtype=torch.float32, device=device)
        for lo, block in features.chunks():
            out[lo:lo + len(block)] = torch.as_tensor(np.asarray(block, dtype=np.float32)).to(device)
        return out
    X = features if torch.is_tensor(features) else torch.as_tensor(np.asarray(features))
    return (X if X.dtype in (torch.float32, torch.float64) else X.float()).to(device)


class _DeviceLazy:
    """Bounds on the device and the rule that turns them into the naive greedy's pick."""

    def __init__(self, obj: DeviceLogDet, costs: np.ndarray, rule: str, fits: np.ndarray, block: int,
                 max_block: int):
        dev = obj.device
        self.obj, self.block, self.min_block, self.max_block = obj, block, block, max_block
        self.costs = torch.as_tensor(costs, dtype=torch.int64, device=dev)
        div = np.maximum(costs, 1).astype(np.float64) if rule == "ratio" else np.ones(obj.n)
        self.div = torch.as_tensor(div, device=dev)
        self.ub = torch.full((obj.n,), -math.inf, dtype=torch.float64, device=dev)
        self.fresh = torch.full((obj.n,), -1, dtype=torch.int64, device=dev)
        self.rounds = 0
        alive = np.flatnonzero(fits)
        order = alive[np.argsort(obj.lengths[alive], kind="stable")]   # similar widths share a batch
        chunk = max(1, obj.batch_rows // max(int(obj.lengths.max(initial=1)), 1))
        for lo in range(0, len(order), chunk):
            cand_h = order[lo:lo + chunk]
            cand = torch.as_tensor(cand_h, device=dev)
            g = obj.gains(cand, int(obj.lengths[cand_h].max(initial=0)))
            self.ub[cand] = quantize_t(g / self.div[cand])
        self.fresh[torch.as_tensor(alive, device=dev)] = 0              # exact at the first pick

    def next_pick(self, step: int, remaining: int | None) -> int | None:
        if remaining is not None:   # what no longer fits never will: the budget only shrinks
            self.ub.masked_fill_(self.costs > remaining, -math.inf)
        size = self.block
        while True:
            self.rounds += 1
            m = min(size + 1, self.obj.n)
            vals, idx = torch.topk(self.ub, m)
            stale = self.fresh[idx[:size]] != step
            packed = torch.stack([vals.double(), idx.double(), torch.cat([stale, stale.new_zeros(m - len(stale))])
                                  .double()])
            vals_h, idx_h, stale_h = packed.cpu().numpy()                # the round's one read-back
            idx_h, stale_h = idx_h.astype(np.int64), stale_h.astype(bool)
            top = min(size, m)
            alive = vals_h[:top] > -math.inf
            if not alive.any():
                return None
            evaluate = np.flatnonzero(alive & stale_h[:top])
            keys = vals_h[:top].copy()
            if len(evaluate):
                cand_h = idx_h[evaluate]
                cand = torch.as_tensor(cand_h, device=self.obj.device)
                g = quantize_t(self.obj.gains(cand, int(self.obj.lengths[cand_h].max())) / self.div[cand])
                self.ub[cand] = g
                self.fresh[cand] = step
                keys[evaluate] = g.cpu().numpy()
            keys[~alive] = -math.inf
            best = keys.max()
            outside = vals_h[top] if m > top else -math.inf            # every bound not in the block is <= this
            if best > outside:
                winners = idx_h[:top][keys == best]
                looked = int((vals_h[:top] >= best).sum())
                self.block = int(np.clip(looked + looked // 4, self.min_block, self.max_block))
                return int(winners.min())
            size = min(2 * size, self.obj.n)


def device_lazy_greedy(obj: DeviceLogDet, k: int | None = None, token_budget: int | None = None, costs=None,
                       rule: str = "ratio", block: int = 64, max_block: int = 1 << 15) -> GreedyResult:
    """The lazy greedy with bounds, blocks and decisions on `obj.device`: exactly the naive greedy's picks."""
    t0 = time.perf_counter()
    rule = check_rule(rule, token_budget)
    k, costs, fits = greedy_setup(obj, k, token_budget, costs)
    st = _DeviceLazy(obj, costs, rule, fits, block, max_block)
    picks, gains, used = lazy_loop(obj, st, k, costs, token_budget)
    gains_h = torch.stack(gains).cpu().numpy().tolist() if gains else []
    info = {"rule": rule, "tokens": used, "rounds": st.rounds, "device": str(obj.device)}
    return GreedyResult(picks, gains_h, obj.value(), obj.initial_value(), obj.n_evals,
                        time.perf_counter() - t0, "lazy", info)
