"""FisherSFT's trace screen on the host: every sentence's packed Gram kept once, read a block at a time.

The float32 screen (`LogDetObjective.screen32`) bounds a gain by Jensen, gain <= r log(1 + t / r), with
t = tr(X_i A^-1 X_i^T) = <X_i^T X_i, A^-1>. With every X_i^T X_i kept packed (its upper triangle, off-diagonals
doubled, [N, d(d+1)/2], float16 below) t is d(d+1)/2 multiply-adds instead of the L d^2 of X_i U. On near-isotropic
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
* The bytes. Reading rows is bound by memory bandwidth (about 8 GB/s on one core here), so each row is kept in
  float16, scaled by a power of two s_i >= its largest entry (exact, and no overflow): half the bytes to read,
  and half the memory to fault in (this VM spent 4-5 s of system time first-touching the 832 MB float32 cache
  at N=100,000). The rounding to float16 moves each entry by at most u16 |c| + 2^-25 s_i (u16 = 2^-11; the
  second term below float16's normal range), so the trace by at most u16 sum |C||A^-1| + 2^-25 s_i sum |P|,
  the first bounded as above: the error bound grows by u16 / u32 = 4,096 times the Gershgorin-or-rho term,
  about 5e-4 of t. On random-scales and near-isotropic that let 4-5% more sentences through to the float32
  gain; the rows cost 0.84 instead of 1.14 us each.
* The basis. Both bounds are entrywise, so they hold only where the traces' terms do not cancel: in a random
  basis (issue 25's rotated-laplace) sum |C||A^-1| was 2,330 t and the bound 6.5 t. A trace is the same in any
  orthonormal basis, so where the pool's token second moment S is far from diagonal (`ROTATE_ABOVE`) the Grams
  are kept in S's eigenvectors Q (X Q in float64, rounded once to float32: two more u in the accumulation
  factor) against Q^T A^-1 Q, which is near diagonal there; the bound fell to 9e-4 t.
"""
from __future__ import annotations

import numpy as np
import torch

EPS32 = float(np.finfo(np.float32).eps)
EPS16 = 2.0 ** -11 * (1.0 + 2.0 ** -10)  # float16's unit roundoff (round to nearest), padded for the float32
TINY16 = 2.0 ** -25                       # products it multiplies; TINY16: the absolute error below 2^-14
# The screen works in the pool's principal axes when the pool's token second moment S is this far from diagonal
# in the stored basis (lambda_max(D^-1/2 |S| D^-1/2), 1 for a diagonal S): axis-aligned pools skip the rotation
ROTATE_ABOVE = 1.5
ROWS_PER_READ = 256      # gathered rows per product: 2 MB at d=64, cache-resident
# A pick whose screens reach this share of the pool reads every row once, in order, instead: a streamed row
# costs about a third of a gathered one (0.45 against 1.45 us at d=64, with the product), so past a third of
# the pool the pass is cheaper. The first picks of a near-isotropic pool screen all of it, several times over.
FULL_PASS_SHARE = 0.4


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


class PerronBound:
    """Upper bounds of the largest eigenvalue of nonnegative matrices that change a little between calls (one per
    pick): max_i (M v)_i / v_i for a positive v bounds it (Collatz-Wielandt: that is M's norm weighted by v), and
    v is carried a few power steps on from the last call's. On the benchmark generators, within 0.3% of eigvalsh
    on average (2.7% at worst, on the first picks) for a fifth of its cost; never above the largest row sum."""

    STEPS = 4

    def __init__(self):
        self.v: np.ndarray | None = None

    def __call__(self, M: np.ndarray) -> float:
        """M nonnegative with a positive diagonal, so every power step keeps v positive."""
        v = self.v if self.v is not None and len(self.v) == len(M) else np.ones(len(M))
        best = float(M.sum(1).max())                     # v = 1: the largest row sum
        for _ in range(self.STEPS):
            w = M @ v
            best = min(best, float((w / v).max()))
            v = np.maximum(w / w.max(), 1e-150)          # a direction M decouples must not underflow to 0
        self.v = v
        return best * (1.0 + 1e-9) + 1e-12              # the float64 products' rounding, relative d u


def diagonal_scaled_norm(M: np.ndarray, diag: np.ndarray | None = None, bound=largest_eigenvalue) -> float:
    """rho = lambda_max(D^-1/2 |M| D^-1/2), D = diag(M) unless given: sum |a| |M| |a| <= rho sum_k D_k a_k^2.
    `bound`: an upper bound of a nonnegative matrix's largest eigenvalue (eigvalsh's, or a `PerronBound`)."""
    scale = 1.0 / np.sqrt(np.diagonal(M) if diag is None else diag)
    return bound(np.abs(M) * scale[:, None] * scale[None, :])


class TraceCache:
    """Packed float16 Grams of every sentence (in the pool's principal axes where its second moment is far from
    diagonal), with traces against the current A^-1 and their rounding bounds."""

    @staticmethod
    def suits(obj, max_bytes: int) -> bool:
        return obj.device.type == "cpu" and obj.n * (obj.d * (obj.d + 1) // 2) * 2 <= max_bytes

    def __init__(self, obj):
        self.obj = obj
        self.layout = PackedUpper(obj.d)
        self.p = self.layout.p
        self.C = np.empty((obj.n, self.p), dtype=np.float16)   # packed Q^T Gram_i Q / scale_i
        self.scale = np.ones(obj.n, dtype=np.float64)          # powers of two
        self.Q = self._principal_axes()                          # None: the stored basis
        self._Q_t = None if self.Q is None else torch.from_numpy(self.Q)
        # diag(Gram_i) in the stored basis, for `scaled`, when C is rotated (else C's own diagonal)
        self.diag = None if self.Q is None else np.empty((obj.n, obj.d), dtype=np.float32)
        self._grams = torch.empty(0)
        self._build()
        self._half = np.empty((ROWS_PER_READ, self.p), dtype=np.float16)
        self._buffer = np.empty((ROWS_PER_READ, self.p), dtype=np.float32)
        # torch views of the buffers: torch converts float16 to float32 vectorized, numpy ~25x slower
        self._half_t, self._buffer_t = torch.from_numpy(self._half), torch.from_numpy(self._buffer)
        self._abs_packed = self._diag_sum = 0.0   # sum |P'| over the packed places and sum diag(P'): TINY16's
        self._at: int | None = None     # the pick count the packed rotated A^-1 (P' = Q^T A^-1 Q) belongs to
        self._packed = np.zeros(self.p, dtype=np.float32)
        self._diag_rotated = np.zeros(obj.d, dtype=np.float32)
        self._diag = np.zeros(obj.d, dtype=np.float64)    # diag(A^-1), stored basis
        self._rho = self._rho_u = self._rho_rotated = 1.0
        self._perron = {name: PerronBound() for name in ("rotated", "stored", "u")}
        self._screened = self._screened_before = 0   # rows screened at this pick and at the one before
        self._every: np.ndarray | None = None         # [N, 2] products of every row, at this pick

    def _principal_axes(self, max_rows: int = 1 << 20) -> np.ndarray | None:
        """Q: the eigenvectors of the pool's token second moment S (float64, orthogonal to ~1e-15; from up to
        `max_rows` rows in evenly spread slices: any orthogonal Q keeps the traces, a rough one aligns A^-1), or
        None where S is near diagonal already (`ROTATE_ABOVE`)."""
        total = int(self.obj.offsets[-1])
        step = 1 << 14
        starts = np.arange(0, total, step)
        starts = starts[np.linspace(0, len(starts) - 1, min(len(starts), max_rows // step)).astype(np.int64)] \
            if len(starts) else starts
        S = np.zeros((self.obj.d, self.obj.d))
        for lo in starts:
            b = self._rows(int(lo), min(total, int(lo) + step))
            S += (b.T @ b).double().numpy()
        if not S.diagonal().all() or diagonal_scaled_norm(S) <= ROTATE_ABOVE:
            return None
        return np.linalg.eigh(S)[1]

    def _build(self) -> None:
        """One pass in index order. A block of equal-length sentences is a slice of the rows (no index arrays);
        others are gathered zero-padded, by length, as the objective's chunks (padding adds nothing to a Gram)."""
        obj = self.obj
        per_block = max(1, obj.batch_rows // max(int(obj.lengths.mean()) if obj.n else 1, 1))
        for lo in range(0, obj.n, per_block):
            hi = min(obj.n, lo + per_block)
            lens = obj.lengths[lo:hi]
            if lens[0] > 0 and (lens == lens[0]).all():
                self._keep(self._rows(int(obj.offsets[lo]), int(obj.offsets[hi])).reshape(hi - lo, int(lens[0]), -1),
                           slice(lo, hi))
                continue
            block = np.arange(lo, hi)
            for _, chunk in obj.chunks(block):
                cand = block[chunk]
                width = int(obj.lengths[cand].max())
                if width:
                    self._keep(obj.gather(cand, width, torch.float32), cand)
                else:
                    self.C[cand] = 0.0
                    if self.diag is not None:
                        self.diag[cand] = 0.0

    def _rows(self, start: int, stop: int) -> torch.Tensor:
        obj = self.obj
        if obj.rows is not None:
            return torch.from_numpy(np.asarray(obj.rows[start:stop], dtype=np.float32))
        return obj.X[start:stop].to(torch.float32)

    def _keep(self, X: torch.Tensor, rows) -> None:
        """C[rows] = the packed Y_b^T Y_b of every [L, d] matrix of the batch X, over its power-of-two scale, with
        Y = X or, rotated, X Q in float64 rounded once to float32 (within u |y|: two more u in the bound's
        accumulation factor) and diag[rows] = diag(X_b^T X_b). The Grams go to one reused buffer (a fresh 2 MB
        tensor a block is mapped and unmapped every time)."""
        if self._grams.shape[0] < len(X):
            self._grams = torch.empty((len(X), X.shape[2], X.shape[2]), dtype=torch.float32)
        grams = self._grams[:len(X)]
        if self.Q is None:
            Y = X
        else:
            X64 = X.double()
            self.diag[rows] = X64.square().sum(1).numpy()
            Y = (X64 @ self._Q_t).float()
        torch.bmm(Y.transpose(1, 2), Y, out=grams)
        packed = self.layout.pack(grams).numpy()
        _, exponent = np.frexp(np.abs(packed).max(1))         # max = m 2^e, 1/2 <= m < 1 (0: e = 0)
        scale = np.ldexp(1.0, exponent)
        self.scale[rows] = scale
        self.C[rows] = torch.from_numpy(packed / scale[:, None].astype(np.float32)).to(torch.float16).numpy()

    def _refresh(self) -> None:
        """Once per pick: the packed float32 P' = Q^T A^-1 Q, its diagonal and rho (rotated basis, for the
        traces), diag(A^-1) and rho of A^-1 and of |U| |U|^T (stored basis, for the margin's scaled norm)."""
        at = len(self.obj.picked)
        if self._at == at:
            return
        P = self.obj.Ainv.cpu().numpy()
        rotated = P if self.Q is None else self.Q.T @ P @ self.Q
        self._packed = self.layout.upper(rotated).astype(np.float32)
        self._diag_rotated = np.diagonal(rotated).astype(np.float32)
        self._abs_packed = float(np.abs(self._packed).sum(dtype=np.float64)) * (1.0 + 1e-6)
        self._diag_sum = float(self._diag_rotated.sum(dtype=np.float64)) * (1.0 + 1e-6)
        self._diag = np.diagonal(P).copy()
        self._rho = diagonal_scaled_norm(P, bound=self._perron["stored"])
        self._rho_rotated = self._rho if self.Q is None else diagonal_scaled_norm(rotated,
                                                                                 bound=self._perron["rotated"])
        if self.obj.U is None:       # A = lam I: U = I / sqrt(lam), |U||U|^T = A^-1
            self._rho_u = self._rho
        else:
            U = np.abs(self.obj.U.cpu().numpy())
            self._rho_u = diagonal_scaled_norm(U @ U.T, np.diagonal(P), bound=self._perron["u"])
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
        scale = self.scale[cand]
        if self._every is None and max(self._screened, self._screened_before) > FULL_PASS_SHARE * obj.n:
            self._every = np.empty((obj.n, 2), dtype=np.float64)
            for lo in range(0, obj.n, ROWS_PER_READ):
                m = min(ROWS_PER_READ, obj.n - lo)
                self._buffer_t[:m].copy_(torch.from_numpy(self.C[lo:lo + m]))
                self._products(self._buffer[:m], self._every[lo:lo + m])
            self._every *= self.scale[:, None]
        if self._every is not None:
            both = self._every[cand]
        else:
            both = np.empty((len(cand), 2), dtype=np.float64)
            order = np.argsort(cand, kind="stable")
            for lo in range(0, len(cand), ROWS_PER_READ):
                pos = order[lo:lo + ROWS_PER_READ]
                m = len(pos)
                np.take(self.C, cand[pos], axis=0, out=self._half[:m])
                self._buffer_t[:m].copy_(self._half_t[:m])
                both[pos] = self._products(self._buffer[:m])
            both *= scale[:, None]
        gershgorin = obj.sq_norms[cand] * obj.ainv_bound      # ||X_i||_F and ||A^-1||: the same in any basis
        # sum_k P'_kk C'_kk: a float32 sum of positive terms (each factor rounded once), relative error below
        # (d + 3) u; the float16 diagonals are below the true ones by at most u16 and TINY16
        w_rotated = (np.maximum(both[:, 1], 0.0) + TINY16 * scale * self._diag_sum) * (
            (1.0 + (obj.d + 3) * EPS32) / (1.0 - EPS16))
        accumulation = obj.lengths[cand] + self.p / 8 + obj.kappa + 2
        bound = np.minimum(gershgorin, self._rho_rotated * w_rotated)
        err = (EPS32 * accumulation + EPS16) * bound + TINY16 * scale * self._abs_packed
        if self.Q is None:
            w = w_rotated
        else:  # X Q in float64 (error ~ d u64 ||X_i||^2 per Gram entry): 1e-11 of Gershgorin's covers it
            err += 1e-11 * gershgorin
            w = (self.diag[cand].astype(np.float64) @ self._diag) * (1.0 + (obj.d + 3) * EPS32)
        # the margin's ||X_i||^2 ||A^-1|| scaled in the stored basis, where X U is rounded
        # (`LogDetObjective.margin`): (sqrt(rho_P w) + sqrt(rho_U w))^2 <= 4 max(rho) w
        return both[:, 0], err, 4.0 * max(self._rho, self._rho_u) * w

    def _products(self, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """[rows, 2]: each packed rotated Gram times the packed P', and its diagonal times diag(P')."""
        out = np.empty((len(rows), 2), dtype=np.float64) if out is None else out
        out[:, 0] = rows @ self._packed
        out[:, 1] = rows[:, self.layout.diagonal_at] @ self._diag_rotated
        return out
