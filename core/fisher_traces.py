"""FisherSFT's trace screen on the host: every sentence's packed Gram kept once, read a block at a time.

The float32 screen (`LogDetObjective.screen32`) bounds a gain by Jensen, gain <= r log(1 + t / r), with
t = tr(X_i A^-1 X_i^T) = <X_i^T X_i, A^-1>. With every X_i^T X_i kept packed (its upper triangle, off-diagonals
doubled, float32 [N, d(d+1)/2]) t is d(d+1)/2 multiply-adds instead of the L d^2 of X_i U. On near-isotropic
pools the lazy greedy screens thousands of sentences per pick, so two costs decide its speed:

* Reading the rows. A fancy-indexed gather of thousands of 8 KB rows at once (d=64) runs at about a quarter of
  the speed of a contiguous product (1.5-2.2 us against 0.33-0.42 us per row, one core): the rows are gathered
  here in index order, 256 at a time, into one reused buffer that stays in the cache.
* The rounding bound. t must be an upper bound of the exact trace, so its float32 error is added. The error of
  the stored Gram, of A^-1 rounded to float32 and of the dot over p = d(d+1)/2 terms is at most
  (L + p/8 + 1) u sum_t |x_t|^T |A^-1| |x_t| (p/8: blocked partial sums). Bounding |A^-1| by its Gershgorin
  norm gives u ||X_i||_F^2 ||A^-1||, which is as large as the gains themselves where a few weak directions keep
  ||A^-1|| near 1/lam while the trace is ~1e-4 of it (issue 25's random per-dimension scales: every screen
  was wasted there and the greedy ran unscreened). With D = diag(A^-1) and rho = lambda_max(D^-1/2 |A^-1|
  D^-1/2), sum_t |x_t|^T |A^-1| |x_t| <= rho sum_k D_k (X_i^T X_i)_kk, which is about t itself wherever A^-1
  is near diagonal; the smaller of the two bounds is used, so it is never looser than the Gershgorin one.
"""
from __future__ import annotations

import numpy as np
import torch

EPS32 = float(np.finfo(np.float32).eps)
ROWS_PER_READ = 256      # gathered rows per product: 2 MB at d=64, cache-resident


class TraceCache:
    """Packed float32 Grams of every sentence and their diagonals, with traces against the current A^-1."""

    @staticmethod
    def suits(obj, max_bytes: int) -> bool:
        return obj.device.type == "cpu" and obj.n * (obj.d * (obj.d + 1) // 2) * 4 <= max_bytes

    def __init__(self, obj):
        self.obj = obj
        d = obj.d
        self.iu = np.triu_indices(d)
        self.p = len(self.iu[0])
        self.weight = torch.from_numpy(np.where(self.iu[0] == self.iu[1], 1.0, 2.0)).to(torch.float32)
        self.flat = torch.from_numpy(self.iu[0] * d + self.iu[1])
        self.C = self._build()
        self.diag = np.ascontiguousarray(self.C[:, np.flatnonzero(self.iu[0] == self.iu[1])])
        self._buffer = np.empty((ROWS_PER_READ, self.p), dtype=np.float32)
        self._at: int | None = None     # the pick count the packed A^-1 below belongs to
        self._packed = self._ainv_diag = None
        self._rho = 1.0

    def _build(self) -> np.ndarray:
        """One pass in index order. A block of equal-length sentences is a slice of the rows (no index arrays);
        others are gathered zero-padded, by length, as the objective's chunks (padding adds nothing to a Gram)."""
        obj = self.obj
        C = np.empty((obj.n, self.p), dtype=np.float32)
        per_block = max(1, obj.batch_rows // max(int(obj.lengths.mean()) if obj.n else 1, 1))
        for lo in range(0, obj.n, per_block):
            hi = min(obj.n, lo + per_block)
            lens = obj.lengths[lo:hi]
            if lens[0] > 0 and (lens == lens[0]).all():
                self._pack(self._rows(int(obj.offsets[lo]), int(obj.offsets[hi])).reshape(hi - lo, int(lens[0]), -1),
                           C[lo:hi])
                continue
            block = np.arange(lo, hi)
            for _, chunk in obj.chunks(block):
                cand = block[chunk]
                width = int(obj.lengths[cand].max())
                out = np.zeros((len(cand), self.p), dtype=np.float32)
                if width:
                    self._pack(obj.gather(cand, width, torch.float32), out)
                C[cand] = out
        return C

    def _rows(self, start: int, stop: int) -> torch.Tensor:
        obj = self.obj
        if obj.rows is not None:
            return torch.from_numpy(np.asarray(obj.rows[start:stop], dtype=np.float32))
        return obj.X[start:stop].to(torch.float32)

    def _pack(self, X: torch.Tensor, out: np.ndarray) -> None:
        """out = the packed X_b^T X_b of every [L, d] matrix of the batch X."""
        G = torch.bmm(X.transpose(1, 2), X).reshape(len(X), -1)
        torch.index_select(G, 1, self.flat, out=torch.from_numpy(out)).mul_(self.weight)

    def _refresh(self) -> None:
        """The packed float32 A^-1, its diagonal and rho, once per pick."""
        at = len(self.obj.picked)
        if self._at == at:
            return
        P = self.obj.Ainv.cpu().numpy()
        self._packed = P[self.iu].astype(np.float32)
        diag = np.diagonal(P).copy()
        self._ainv_diag = diag
        scale = 1.0 / np.sqrt(diag)
        S = np.abs(P) * scale[:, None] * scale[None, :]
        # eigvalsh is backward stable (error ~ d u ||S||); the pad keeps rho an upper bound
        self._rho = float(np.linalg.eigvalsh(S)[-1]) * (1.0 + 1e-9) + 1e-12
        self._at = at

    def packed_ainv(self) -> np.ndarray:
        """A^-1's upper triangle in float32, in the order of the cache's rows."""
        self._refresh()
        return self._packed

    def traces(self, cand: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(t, err): float32 traces <X_i^T X_i, A^-1> of `cand` in float64 and bounds of their rounding error
        (module docstring)."""
        self._refresh()
        cand = np.asarray(cand, dtype=np.int64)
        t = np.empty(len(cand), dtype=np.float64)
        order = np.argsort(cand, kind="stable")
        for lo in range(0, len(cand), ROWS_PER_READ):
            pos = order[lo:lo + ROWS_PER_READ]
            rows = self._buffer[:len(pos)]
            np.take(self.C, cand[pos], axis=0, out=rows)
            t[pos] = rows @ self._packed
        return t, self.error(cand)

    def error(self, cand: np.ndarray) -> np.ndarray:
        """A bound of |float32 trace - exact trace| of each of `cand` (module docstring)."""
        self._refresh()
        obj = self.obj
        gershgorin = obj.sq_norms[cand] * obj.ainv_bound
        # float32 diagonals times float64 weights: positive terms, relative error below (d + 1) u
        weighted = self._rho * (self.diag[cand] @ self._ainv_diag) * (1.0 + (obj.d + 1) * EPS32)
        accumulation = obj.lengths[cand] + self.p / 8 + obj.kappa
        return EPS32 * accumulation * np.minimum(gershgorin, weighted)
