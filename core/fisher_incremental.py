"""FisherSFT's screening at wide features (d much larger than a sentence's L): Gram matrices kept up to date.

The gain of sentence i is log det(I + M_i) with M_i = X_i A^-1 X_i^T, an L x L matrix. Every pick p changes
A^-1 by a rank-L_p Woodbury step, A^-1 <- A^-1 - W_p^T W_p with W_p = chol(S_p)^-1 X_p A^-1 (S_p = I + M_p), so

    M_i <- M_i - (X_i W_p^T)(X_i W_p^T)^T:

L L_p d work per pick the sentence missed, against L d^2 for X_i A^-1 X_i^T afresh. At d=576 and L=32 a
candidate one pick stale costs about 1/18 of a fresh evaluation, in float64, so its margin is about 10^8 times
narrower than the float32 screen's (whose rounding margin, some 10^-7 x ||X_i||^2 ||A^-1||, is of the order of
the gains themselves with SmolLM2's norm-49 tokens: then every screened candidate had to be re-checked).

These are screens, not decisions: the lazy greedy still re-checks every candidate that can win with the
objective's own float64 gain (what the naive greedy computes), so the picks stay the naive greedy's. The margin
covers float64 rounding of the products and of the Woodbury chain; the lazy greedy measures it on every re-check
and widens it (`kappa`) if an error ever comes within half of it.
"""
from __future__ import annotations

import math

import numpy as np
import torch

EPS64 = float(np.finfo(np.float64).eps)
WIDE_RATIO = 4               # d / mean L from which keeping Grams beats recomputing them
CACHE_BYTES = 1 << 30        # the Grams of every sentence, float64


class IncrementalGrams:
    """M_i of every sentence screened so far, each current as of some pick, and the Woodbury factors W_p."""

    @staticmethod
    def suits(obj, max_bytes: int = CACHE_BYTES) -> bool:
        lengths = obj.lengths.astype(np.int64)
        return (obj.device.type == "cpu" and obj.n > 0 and lengths.max(initial=0) <= obj.d
                and obj.d >= WIDE_RATIO * max(float(lengths.mean()), 1.0)
                and int((lengths ** 2).sum()) * 8 <= max_bytes)

    def __init__(self, obj):
        self.obj = obj
        sizes = obj.lengths.astype(np.int64) ** 2
        self.start = np.concatenate([[0], np.cumsum(sizes)])
        self.M = np.empty(int(self.start[-1]), dtype=np.float64)
        self.at = np.full(obj.n, -1, dtype=np.int64)     # picks M_i includes (-1: never computed)
        self.rows = [0]                                  # W_p is rows[p]:rows[p + 1] of the stacked factors
        self._stack = torch.zeros(max(obj.d, 64), obj.d, dtype=torch.float64)   # grown by doubling
        self.picked_trace = 0.0                          # tr(A) - d lam: for a bound on A's condition number

    # ------------------------------------------------------------------ bookkeeping
    def record(self, i: int, chol_S: torch.Tensor, Z: torch.Tensor) -> None:
        """After picking sentence i: W_p = chol(S_p)^-1 Z_p, Z_p = X_i A^-1 (both from `LogDetObjective.add`)."""
        self.picked_trace += float(self.obj.sq_norms[i])
        W = torch.linalg.solve_triangular(chol_S, Z, upper=False)
        end = self.rows[-1] + W.shape[0]
        if end > self._stack.shape[0]:
            grown = torch.zeros(max(end, 2 * self._stack.shape[0]), self.obj.d, dtype=torch.float64)
            grown[:self.rows[-1]] = self._stack[:self.rows[-1]]
            self._stack = grown
        self._stack[self.rows[-1]:end] = W
        self.rows.append(end)

    def stacked(self) -> torch.Tensor:
        return self._stack[:self.rows[-1]]

    def _flat_index(self, cand: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
        """Positions of each candidate's M_i entries in the ragged store, laid out as a padded [B, width, width]."""
        L = self.obj.lengths[cand]
        r = np.arange(width)
        inside = (r[None, :, None] < L[:, None, None]) & (r[None, None, :] < L[:, None, None])
        idx = self.start[cand][:, None, None] + r[None, :, None] * L[:, None, None] + r[None, None, :]
        return np.where(inside, idx, 0), inside

    # ------------------------------------------------------------------ evaluation
    def screen(self, cand: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(gains, upper bounds, margins) of `cand` at the current A, every gain computed (float64)."""
        g = np.zeros(len(cand))
        eps = np.zeros(len(cand))
        for _, chunk in self.obj._chunks(cand):
            g[chunk], eps[chunk] = self._screen_chunk(cand[chunk])
        return g, g + eps, eps

    def _screen_chunk(self, cand: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        obj, now = self.obj, len(self.rows) - 1
        lens = obj.lengths[cand]
        width = int(lens.max()) if len(cand) else 0
        if width == 0:
            return np.zeros(len(cand)), np.zeros(len(cand))
        X = obj._gather(cand, width)                                            # [B, width, d] float64
        M = torch.zeros(len(cand), width, width, dtype=torch.float64)
        at = self.at[cand]
        missed = now - at                                                       # picks each M_i lacks
        rows = np.asarray(self.rows)
        missed_rows = np.where(at >= 0, rows[now] - rows[np.maximum(at, 0)], 0)
        # a Gram more than about d rows of downdates behind is cheaper to compute afresh
        fresh = (at < 0) | (missed_rows > obj.d)
        if fresh.any():
            pos = torch.from_numpy(np.flatnonzero(fresh))
            Y = obj.times_U(X[pos], obj.U)
            M[pos] = Y @ Y.transpose(1, 2)
        idx, inside = self._flat_index(cand, width)
        kept = np.flatnonzero(~fresh)
        if len(kept):
            M[torch.from_numpy(kept)] = torch.from_numpy(np.where(inside[kept], self.M[idx[kept]], 0.0))
        stale = kept[missed[kept] > 0]
        if len(stale):
            self._downdate(X, M, stale, missed_rows[stale], rows[now])
        self.M[idx[inside]] = M.numpy()[inside]
        self.at[cand] = now
        M.diagonal(dim1=1, dim2=2).add_(1.0)                                   # stored above: I + M in place
        chol, info = torch.linalg.cholesky_ex(M)
        g = (2.0 * chol.diagonal(dim1=1, dim2=2).log().sum(-1)).numpy()
        bad = (info != 0).numpy()
        if bad.any():  # not positive definite by rounding: the objective's own gain for those few
            g[bad] = obj._batch_gains(cand[bad], "L").numpy()
        return g, self.margin(cand, np.where(fresh, 0, missed))

    def _downdate(self, X: torch.Tensor, M: torch.Tensor, stale: np.ndarray, behind: np.ndarray, end: int) -> None:
        """M[stale] -= P P^T with P = X W^T over the factor rows each Gram missed. Grams about equally far behind
        share one product (one GEMM against the rows the furthest of them missed, the rows the others already
        have masked out): at most twice the work of exact per-Gram products, in a few large GEMMs instead of
        one small product per pick count."""
        stack = self.stacked()
        order = np.argsort(behind, kind="stable")
        lo = 0
        while lo < len(order):
            hi = int(np.searchsorted(behind[order], 2 * behind[order[lo]], side="right"))
            group, span = stale[order[lo:hi]], int(behind[order[hi - 1]])
            P = X[torch.from_numpy(group)] @ stack[end - span:end].T                   # [b, width, span]
            missing = torch.from_numpy(behind[order[lo:hi]])
            P *= (torch.arange(span) >= span - missing[:, None]).to(P.dtype)[:, None, :]
            M[torch.from_numpy(group)] -= P @ P.transpose(1, 2)
            lo = hi

    def margin(self, cand: np.ndarray, missed: np.ndarray) -> np.ndarray:
        """|gain here - the objective's float64 gain| is modelled as float64 rounding of d-term products over
        ||X_i||_F^2 ||A^-1||: once for the Gram, once per downdate since (each bounded by 1/lam), the Woodbury
        chain's drift between the objective's refactorings (`refresh_every` picks), and the square root of a
        bound on A's condition number (the objective's own A^-1 loses digits as A grows ill-conditioned). A
        model, not a proof (a worst-case bound grows with the full condition number and would be as wide as the
        float32 one): every re-check measures the error against it, and the objective's `kappa` is widened 4x
        for the rest of the run when one comes within half of it."""
        obj = self.obj
        condition = (obj.lam * obj.d + self.picked_trace) * obj.ainv_bound
        products = (obj.d + math.sqrt(condition)) * obj.ainv_bound \
            + (missed + obj.refresh_every) * math.sqrt(obj.d) / obj.lam
        return obj.kappa * EPS64 * (obj.sq_norms[cand] * products + np.sqrt(obj.lengths[cand]) + 1.0)
