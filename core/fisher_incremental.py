"""FisherSFT's screening at wide features (d much larger than a sentence's L): Gram matrices kept up to date.

The gain of sentence i is log det(I + M_i) with M_i = X_i A^-1 X_i^T, an L x L matrix. Every pick p changes
A^-1 by a rank-L_p Woodbury step, A^-1 <- A^-1 - W_p^T W_p with W_p = chol(S_p)^-1 X_p A^-1 (S_p = I + M_p), so

    M_i <- M_i - (X_i W_p^T)(X_i W_p^T)^T:

L L_p d work per pick, against L d^2 for X_i A^-1 X_i^T afresh (1/18 of it at d=576, L=32), in float64, so the
margin is about 10^5 times narrower than the float32 screen's (whose rounding margin, some 10^-7 x ||X_i||^2
||A^-1||, is of the order of the gains themselves with SmolLM2's norm-49 tokens: every screened candidate had to
be re-checked). One shared direction makes every sentence's gain alike, so the lazy greedy screens the same
large set (a sixth to a half of the pool) pick after pick: those sentences are kept hot, their features and
Grams in contiguous slots, and downdated together by one GEMM per pick. (Keeping every screened Gram and
bringing it up to date when screened again did the same arithmetic as scattered gathers and skinny products:
1.9x over the float32 screen at N=2,000 where this is more.)

These are screens, not decisions: the lazy greedy still re-checks every candidate that can win with the
objective's own float64 gain (what the naive greedy computes), so the picks stay the naive greedy's. The margin
covers float64 rounding of the products and of the Woodbury chain; the lazy greedy measures it on every re-check
and widens it (`kappa`) if an error ever comes within half of it.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from sftcurate.core.fisher_traces import PackedUpper

EPS64 = float(np.finfo(np.float64).eps)
WIDE_RATIO = 4               # d / mean L from which keeping Grams beats recomputing them
HOT_BYTES = 2 << 30          # HotGrams: every sentence's float64 features and Gram
STALE_BYTES = 1 << 30        # StaleGrams: every sentence's float64 Gram
KEEP_STEPS = 32              # a hot sentence no screen asked for in this many picks goes cold


def wide(obj) -> bool:
    lengths = obj.lengths.astype(np.int64)
    return (obj.device.type == "cpu" and obj.n > 0 and 0 < lengths.max(initial=0) <= obj.d
            and obj.d >= WIDE_RATIO * max(float(lengths.mean()), 1.0))


def gram_margin(obj, cand: np.ndarray, missed: np.ndarray) -> np.ndarray:
    """|gain here - the objective's float64 gain| is modelled as float64 rounding of d-term products over
    ||X_i||_F^2 ||A^-1||: once for the Gram, once per downdate since (each bounded by 1/lam), the Woodbury
    chain's drift between the objective's refactorings (`refresh_every` picks), and the square root of a
    bound on A's condition number (the objective's own A^-1 loses digits as A grows ill-conditioned). A
    model, not a proof (a worst-case bound grows with the full condition number and would be as wide as the
    float32 one): every re-check measures the error against it, and the objective's `kappa` is widened 4x
    for the rest of the run when one comes within half of it."""
    picked_trace = float(obj.sq_norms[obj.picked].sum())       # tr(A) - d lam
    condition = (obj.lam * obj.d + picked_trace) * obj.ainv_bound
    products = (obj.d + math.sqrt(condition)) * obj.ainv_bound \
        + (missed + obj.refresh_every) * math.sqrt(obj.d) / obj.lam
    return obj.kappa * EPS64 * (obj.sq_norms[cand] * products + np.sqrt(obj.lengths[cand]) + 1.0)


def logdets(G: torch.Tensor) -> torch.Tensor:
    """log det of each positive definite matrix of a batch, by Cholesky; slogdet for the few that rounding made
    not positive definite."""
    chol, info = torch.linalg.cholesky_ex(G)
    out = 2.0 * chol.diagonal(dim1=1, dim2=2).log().sum(-1)
    bad = info != 0
    if bool(bad.any()):
        out[bad] = torch.linalg.slogdet(G[bad])[1]
    return out


def kept_grams(obj):
    """The screen for a wide pool: HotGrams when every sentence fits in its slots, else StaleGrams, else None
    (the float32 screen)."""
    if HotGrams.suits(obj):
        return HotGrams(obj)
    return StaleGrams(obj) if StaleGrams.suits(obj) else None


class HotGrams:
    """The hot sentences' Grams M_i, each downdated at every pick: what the lazy greedy screens again and again.

    A screened sentence becomes hot (its float64 features and its Gram move into a slot); after each pick one
    GEMM over every hot slot's features, W_p X_hot^T, downdates all their Grams at once, so a hot screen costs a
    Cholesky of I + M_i and no gather. A hot sentence that no screen asked for in KEEP_STEPS picks (its bound
    fell below where the lazy greedy looks) goes cold and frees its slot; a cold one screened again is computed
    afresh. Slots hold at most `max_bytes`; when they are full the slots asked for longest ago are cooled, and
    when every slot was asked for at this pick a screened sentence is computed afresh, unkept."""

    @staticmethod
    def suits(obj, max_bytes: int = HOT_BYTES) -> bool:
        """Slots for the whole pool: with fewer, the screened set outgrew them at N=10,000 (38% of the pool per
        pick) and evicted sentences came back as fresh L d^2 products (217 s for 150 picks, 65 s with room)."""
        return wide(obj) and obj.n * HotGrams.slot_bytes(obj) <= max_bytes

    @staticmethod
    def slot_bytes(obj) -> int:
        """A slot: a sentence's float64 features and Gram, padded to the longest sentence."""
        width = int(obj.lengths.max())
        return 8 * width * (obj.d + width)

    def __init__(self, obj, max_bytes: int = HOT_BYTES, keep_steps: int = KEEP_STEPS):
        self.obj, self.keep_steps = obj, keep_steps
        self.width = int(obj.lengths.max())
        slots = min(obj.n, max_bytes // self.slot_bytes(obj))
        self.X = torch.zeros(slots, self.width, obj.d, dtype=torch.float64)     # hot features, zero-padded
        self.M = torch.zeros(slots, self.width, self.width, dtype=torch.float64)
        self.who = np.full(slots, -1, dtype=np.int64)    # the sentence in each slot
        self.slot = np.full(obj.n, -1, dtype=np.int64)   # the slot of each sentence (-1: cold)
        self.born = np.zeros(slots, dtype=np.int64)      # the pick count when the slot's Gram was computed
        self.asked = np.zeros(slots, dtype=np.int64)     # the last pick count a screen asked for it
        self.used = 0
        self.picks = 0

    # ------------------------------------------------------------------ after a pick
    def record(self, i: int, chol_S: torch.Tensor, Z: torch.Tensor) -> None:
        """After picking sentence i (Z = X_i A^-1 and chol(S_i) from `LogDetObjective.add`): cool the slots no
        screen asked for lately, then M_j -= P_j P_j^T with P_j = X_j W^T, W = chol(S_i)^-1 Z, for every hot j."""
        self.picks += 1
        cold = self.asked[:self.used] < self.picks - self.keep_steps
        if self.slot[i] >= 0:
            cold[self.slot[i]] = True
        self._release(np.flatnonzero(cold))
        if self.used:
            W = torch.linalg.solve_triangular(chol_S, Z, upper=False)         # [L_i, d]
            # W X^T, not X W^T: MKL runs this orientation of the skinny product twice as fast
            PT = W @ self.X[:self.used].reshape(-1, self.obj.d).T              # [L_i, hot * width]
            P = PT.view(len(W), self.used, self.width).permute(1, 2, 0)         # [hot, width, L_i]
            self.M[:self.used].baddbmm_(P, P.transpose(1, 2), alpha=-1.0)

    def _release(self, slots: np.ndarray) -> None:
        """Free `slots`, moving the last used slots into the holes so the hot ones stay contiguous."""
        if not len(slots):
            return
        self.slot[self.who[slots]] = -1
        keep = np.setdiff1d(np.arange(self.used - len(slots), self.used), slots)
        holes = slots[slots < self.used - len(slots)]
        if len(keep):
            src, dst = torch.from_numpy(keep), torch.from_numpy(holes)
            self.X[dst], self.M[dst] = self.X[src], self.M[src]
            for a in ("who", "born", "asked"):
                getattr(self, a)[holes] = getattr(self, a)[keep]
            self.slot[self.who[holes]] = holes
        self.used -= len(slots)

    # ------------------------------------------------------------------ evaluation
    def screen(self, cand: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(gains, upper bounds, margins) of `cand` at the current A, every gain computed (float64)."""
        cand = np.asarray(cand, dtype=np.int64)
        g = np.zeros(len(cand))
        hot = self.slot[cand] >= 0
        cold = cand[~hot]
        step = max(1, self.obj.batch_rows // self.width)  # padded to the slots' width, so chunk by it
        for lo in range(0, len(cold), step):
            self._warm(cold[lo:lo + step])
        slots = self.slot[cand]
        kept = np.flatnonzero(slots >= 0)
        if len(kept):
            self.asked[slots[kept]] = self.picks
            g[kept] = self._logdets(self.M[torch.from_numpy(slots[kept])])
        lost = np.flatnonzero(slots < 0)          # no free slot: computed afresh, not kept
        for _, chunk in self.obj.chunks(cand[lost]):
            idx = cand[lost[chunk]]
            g[lost[chunk]] = self._logdets(self._fresh(idx, int(self.obj.lengths[idx].max()))[1])
        missed = np.where(slots >= 0, self.picks - self.born[np.maximum(slots, 0)], 0)
        eps = self.margin(cand, missed)
        return g, g + eps, eps

    def _fresh(self, cand: np.ndarray, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        X = self.obj.gather(cand, max(width, 1))                              # [B, width, d] float64
        Y = self.obj.times_U(X, self.obj.U)
        return X, Y @ Y.transpose(1, 2)

    def _warm(self, cand: np.ndarray) -> None:
        """Compute the Grams of cold sentences afresh and move them into free slots (as many as fit)."""
        short = len(cand) - (len(self.who) - self.used)
        if short > 0:  # full: cool the slots asked for longest ago (never one asked for at this pick)
            idle = np.flatnonzero(self.asked[:self.used] < self.picks)
            self._release(idle[np.argsort(self.asked[idle], kind="stable")[:short]])
        cand = cand[:len(self.who) - self.used]
        if not len(cand):
            return
        X, M = self._fresh(cand, self.width)
        s = np.arange(self.used, self.used + len(cand))
        dst = torch.from_numpy(s)
        self.X[dst], self.M[dst] = X, M
        self.who[s], self.slot[cand], self.born[s], self.asked[s] = cand, s, self.picks, self.picks
        self.used += len(cand)

    def _logdets(self, M: torch.Tensor) -> np.ndarray:
        """log det(I + M) of each Gram (zero padding adds ones to the diagonal: no effect)."""
        G = M.clone()
        G.diagonal(dim1=1, dim2=2).add_(1.0)
        return logdets(G).numpy()

    def margin(self, cand: np.ndarray, missed: np.ndarray) -> np.ndarray:
        return gram_margin(self.obj, cand, missed)


class StaleGrams:
    """M_i of every sentence screened so far, each current as of some pick, brought up to date when screened
    again from the stacked Woodbury factors W_p: for pools whose features do not fit in `HotGrams`' slots."""

    @staticmethod
    def suits(obj, max_bytes: int = STALE_BYTES) -> bool:
        return wide(obj) and int((obj.lengths.astype(np.int64) ** 2).sum()) * 8 <= max_bytes

    def __init__(self, obj):
        self.obj = obj
        sizes = obj.lengths.astype(np.int64) ** 2
        self.start = np.concatenate([[0], np.cumsum(sizes)])
        self.M = np.empty(int(self.start[-1]), dtype=np.float64)
        self.at = np.full(obj.n, -1, dtype=np.int64)     # picks M_i includes (-1: never computed)
        self.rows = [0]                                  # W_p is rows[p]:rows[p + 1] of the stacked factors
        self._stack = torch.zeros(max(obj.d, 64), obj.d, dtype=torch.float64)   # grown by doubling

    # ------------------------------------------------------------------ bookkeeping
    def record(self, i: int, chol_S: torch.Tensor, Z: torch.Tensor) -> None:
        """After picking sentence i: W_p = chol(S_p)^-1 Z_p, Z_p = X_i A^-1 (both from `LogDetObjective.add`)."""
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
        for _, chunk in self.obj.chunks(cand):
            g[chunk], eps[chunk] = self._screen_chunk(cand[chunk])
        return g, g + eps, eps

    def _screen_chunk(self, cand: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        obj, now = self.obj, len(self.rows) - 1
        lens = obj.lengths[cand]
        width = int(lens.max()) if len(cand) else 0
        if width == 0:
            return np.zeros(len(cand)), np.zeros(len(cand))
        X = obj.gather(cand, width)                                            # [B, width, d] float64
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
            g[bad] = obj.batch_gains(cand[bad], "L").numpy()
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
        return gram_margin(self.obj, cand, missed)


class GradientBounds:
    """Upper bounds of stale gains from the gradient at the point they were computed (the float32 screen, d=64
    class features): the gain f(P) = log det(I + X_i P X_i^T) is concave in P = A^-1, so with H_i = X_i^T
    (I + M_i)^-1 X_i, its gradient at the P_s of the pick count s when the gain was computed,

        f(P_now) <= f(P_s) - <H_i, P_s - P_now>            (P_s - P_now is positive semidefinite)

    tight to first order in the change, unlike the stale gain f(P_s) itself: on pools whose sentences are all
    alike every pick lowers every gain by about the same amount, so stale gains keep thousands of candidates in
    contention per pick that this bound drops after d(d+1)/2 multiply-adds each. H_i is kept packed in float32
    ([N, d(d+1)/2], when it fits in `max_bytes`) with the packed P of every pick count. The float32 H_i is
    off by X_i^T E X_i with ||E||_2 <= ||dM||_2 <= margin_i (E = (I + M~)^-1 - (I + M)^-1), which moves the
    bound by at most margin_i <X_i^T X_i, D> (D = P_s - P_now positive semidefinite, so |<F, D>| <= ||F||_2
    tr D), plus its own float32 rounding, 2 kappa u ||X_i||_F^2 tr D: both are added. <X_i^T X_i, D> comes
    from the trace screen when the objective keeps traces (the screen's upper bound of the sentence's trace at s
    less its lower bound now, usually far below ||X_i||_F^2 tr D), else that product."""

    @staticmethod
    def suits(obj, max_bytes: int = 1 << 30) -> bool:
        return obj.device.type == "cpu" and obj.n * (obj.d * (obj.d + 1) // 2) * 4 <= max_bytes

    def __init__(self, obj):
        self.obj = obj
        self.layout = PackedUpper(obj.d)
        self.H = np.zeros((obj.n, self.layout.p), dtype=np.float32)   # zero pages until written
        self.at = np.full(obj.n, -1, dtype=np.int64)        # the pick count of each H_i (-1: none)
        self.gain_hi = np.zeros(obj.n)                      # an upper bound of the exact gain at that count
        self.eps = np.zeros(obj.n)                          # the float32 margin then
        # <H_i, P_s> and <C_i, P_s> in float64 of the stored float32 H_i and C_i: the bound's <H_i, P_s - P_now>
        # is then one product with P_now per sentence, not one per pick count s
        self.h_then = np.zeros(obj.n)
        self.c_then = np.zeros(obj.n)
        self.packed: list[np.ndarray] = []                  # P = A^-1 of every pick count, packed upper
        self.traces: list[float] = []
        self.record()

    def record(self) -> None:
        """After a pick (and at the start): the new A^-1."""
        P = self.obj.Ainv.cpu().numpy()
        self.packed.append(self.layout.upper(P))
        self.traces.append(float(np.trace(P)))

    def keep(self, cand: np.ndarray, chol: torch.Tensor, ok: np.ndarray, gain_hi: np.ndarray,
             eps: np.ndarray, trace_hi: np.ndarray) -> None:
        """H_i of float32-screened sentences (L form: chol = chol(I + M_i), L x L) whose Cholesky succeeded;
        `trace_hi`: upper bounds of their traces <C_i, P_s> from the screen."""
        pos = np.flatnonzero(ok)
        if not len(pos):
            return
        sel = torch.from_numpy(pos)
        X = self.obj.gather(cand[pos], chol.shape[-1], torch.float32)
        Z = torch.linalg.solve_triangular(chol[sel], X, upper=False)          # chol^-1 X_i
        H = self.layout.pack(Z.transpose(1, 2) @ Z)
        idx = cand[pos]
        self.H[idx] = H.numpy()
        self.at[idx] = len(self.packed) - 1
        self.gain_hi[idx], self.eps[idx] = gain_hi[pos], eps[pos]
        self.h_then[idx] = self.H[idx].astype(np.float64) @ self.packed[-1]
        self.c_then[idx] = trace_hi[pos]

    def bound(self, cand: np.ndarray, traces: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        """Upper bounds of the current float64 gains of `cand` (inf where no H_i is kept); `traces`: their
        <C_i, P_now> from the float32 trace screen and its rounding bounds (`TraceCache.traces`), when the caller
        has them (the rounding is added to the energy term)."""
        out = np.full(len(cand), np.inf)
        pos = np.flatnonzero(self.at[cand] >= 0)
        if not len(pos):
            return out
        idx = cand[pos]
        drop = self.h_then[idx] - self.H[idx].astype(np.float64) @ self.packed[-1]
        tr_D = np.maximum(np.asarray(self.traces)[self.at[idx]] - self.traces[-1], 0.0)
        u = float(np.finfo(np.float32).eps)
        # <C_i, D>: an upper bound of the trace then less a lower bound of it now, else ||X_i||_F^2 tr D
        energy = self.obj.sq_norms[idx] * tr_D if traces is None else \
            np.maximum(self.c_then[idx] - (traces[0][pos] - traces[1][pos]), 0.0)
        slack = energy * self.eps[idx] + (2.0 * self.obj.kappa + 1.0) * u * self.obj.sq_norms[idx] * tr_D
        # float64 products of size d(d+1)/2 over values up to ||X_i||_F^2 ||A^-1||: their rounding, generously
        slack += 1e-12 * self.obj.sq_norms[idx] * self.obj.ainv_bound
        out[pos] = self.gain_hi[idx] - drop + slack
        return out
