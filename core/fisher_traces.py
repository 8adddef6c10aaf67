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
  (L + p/8 + kappa) u sum_t |x_t|^T |A^-1| |x_t| (p/8: blocked partial sums; kappa, the objective's margin
  factor, as headroom). Bounding |A^-1| by its Gershgorin
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
# A pick whose screens reach this share of the pool reads every row once, in order, instead: a streamed row
# costs about a third of a gathered one (0.45 against 1.45 us at d=64, with the product), so past a third of
# the pool the pass is cheaper. The first picks of a near-isotropic pool screen all of it, several times over.
FULL_PASS_SHARE = 0.4
ROWS_PER_PASS = 4096


class PackedUpper:
    """Symmetric d x d matrices as their upper triangles, off-diagonals doubled: <A, B> is the dot of
    `pack(A)` with `upper(B)`, d(d+1)/2 multiply-adds (the kept Grams here, `GradientBounds`' H_i)."""

    def __init__(self, d: int):
        self.iu = np.triu_indices(d)
        self.p = len(self.iu[0])
        self.weight = torch.from_numpy(np.where(self.iu[0] == self.iu[1], 1.0, 2.0)).to(torch.float32)
        self.flat = torch.from_numpy(self.iu[0] * d + self.iu[1])
        self.diagonal_at = np.flatnonzero(self.iu[0] == self.iu[1])   # the diagonal's places in a packed row

    def pack(self, G: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """[B, p] float32 packed, off-diagonals doubled, of a batch G of [B, d, d] float32 matrices."""
        out = torch.index_select(G.reshape(len(G), -1), 1, self.flat, out=out)
        return out.mul_(self.weight)

    def upper(self, P: np.ndarray) -> np.ndarray:
        """P's upper triangle, in the packed order (a copy)."""
        return P[self.iu]


def largest_eigenvalue(S: np.ndarray) -> float:
    """An upper bound of the largest eigenvalue of the symmetric S: eigvalsh is backward stable (error about
    d u ||S||), and the pad covers that."""
    return float(np.linalg.eigvalsh(S)[-1]) * (1.0 + 1e-9) + 1e-12


class TraceCache:
    """Packed float32 Grams of every sentence, with traces against the current A^-1 and their rounding bounds."""

    @staticmethod
    def suits(obj, max_bytes: int) -> bool:
        return obj.device.type == "cpu" and obj.n * (obj.d * (obj.d + 1) // 2) * 4 <= max_bytes

    def __init__(self, obj):
        self.obj = obj
        self.layout = PackedUpper(obj.d)
        self.p = self.layout.p
        self.C = self._build()
        self._buffer = np.empty((ROWS_PER_READ, self.p), dtype=np.float32)
        self._at: int | None = None     # the pick count the packed A^-1 below belongs to
        self._packed = np.zeros(self.p, dtype=np.float32)
        self._diag = np.zeros(obj.d, dtype=np.float32)
        self._rho = self._rho_u = 1.0
        self._screened = self._screened_before = 0   # rows screened at this pick and at the one before
        self._every: np.ndarray | None = None         # [N, 2] products of every row, at this pick

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
        self.layout.pack(torch.bmm(X.transpose(1, 2), X), out=torch.from_numpy(out))

    def _refresh(self) -> None:
        """The packed float32 A^-1, its diagonal and rho, once per pick."""
        at = len(self.obj.picked)
        if self._at == at:
            return
        P = self.obj.Ainv.cpu().numpy()
        diag = np.diagonal(P)
        self._packed = self.layout.upper(P).astype(np.float32)
        self._diag = diag.astype(np.float32)
        scale = 1.0 / np.sqrt(diag)
        self._rho = largest_eigenvalue(np.abs(P) * scale[:, None] * scale[None, :])
        if self.obj.U is None:       # A = lam I: U = I / sqrt(lam), |U||U|^T = A^-1
            self._rho_u = self._rho
        else:
            U = np.abs(self.obj.U.cpu().numpy())
            self._rho_u = largest_eigenvalue((U @ U.T) * scale[:, None] * scale[None, :])
        self._at = at
        self._screened_before, self._screened, self._every = self._screened, 0, None

    def traces(self, cand: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(t, err, scaled): float32 traces <X_i^T X_i, A^-1> of `cand` in float64, bounds of their rounding error
        (module docstring) and the scaled norms `LogDetObjective.margin` uses, all from the same rows, so a row is
        read from memory once: gathered in index order, or every row in one streamed pass where this pick screens
        much of the pool."""
        self._refresh()
        obj = self.obj
        cand = np.asarray(cand, dtype=np.int64)
        self._screened += len(cand)
        if self._every is None and max(self._screened, self._screened_before) > FULL_PASS_SHARE * obj.n:
            self._every = np.empty((obj.n, 2), dtype=np.float64)
            for lo in range(0, obj.n, ROWS_PER_PASS):
                self._products(self.C[lo:lo + ROWS_PER_PASS], self._every[lo:lo + ROWS_PER_PASS])
        if self._every is not None:
            both = self._every[cand]
        else:
            both = np.empty((len(cand), 2), dtype=np.float64)
            order = np.argsort(cand, kind="stable")
            for lo in range(0, len(cand), ROWS_PER_READ):
                pos = order[lo:lo + ROWS_PER_READ]
                rows = self._buffer[:len(pos)]
                np.take(self.C, cand[pos], axis=0, out=rows)
                both[pos] = self._products(rows)
        gershgorin = obj.sq_norms[cand] * obj.ainv_bound
        # a float32 sum of positive terms (the diagonals and diag(A^-1) each rounded once): relative error
        # below (d + 3) u
        w = np.maximum(both[:, 1], 0.0) * (1.0 + (obj.d + 3) * EPS32)
        accumulation = obj.lengths[cand] + self.p / 8 + obj.kappa
        # the margin's ||X_i||^2 ||A^-1|| scaled likewise (`LogDetObjective.margin`): (sqrt(rho_P w) +
        # sqrt(rho_U w))^2 <= 4 max(rho) w
        scaled = 4.0 * max(self._rho, self._rho_u) * w
        return both[:, 0], EPS32 * accumulation * np.minimum(gershgorin, self._rho * w), scaled

    def _products(self, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """[rows, 2]: each packed Gram times the packed A^-1, and its diagonal times diag(A^-1)."""
        out = np.empty((len(rows), 2), dtype=np.float64) if out is None else out
        out[:, 0] = rows @ self._packed
        out[:, 1] = rows[:, self.layout.diagonal_at] @ self._diag
        return out
