"""The trace screen's kept Grams (core.fisher_traces): traces and their rounding bounds against float64."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sftcurate.core.fisher import LogDetObjective
from sftcurate.core.fisher_traces import PerronBound, diagonal_scaled_norm
from tests.test_fisher import feature_generators as generators
from tests.test_fisher import screened_after_picks


def exact_traces(x, off, ainv: np.ndarray) -> np.ndarray:
    X = torch.from_numpy(x.astype(np.float64))
    P = torch.from_numpy(ainv)
    return np.array([float(torch.einsum("ld,de,le->", X[a:b], P, X[a:b]))
                     for a, b in zip(off[:-1], off[1:])])


@pytest.mark.parametrize("name", ["random-scales", "heavy-tailed", "uneven-lengths", "duplicated", "bench",
                                  "rotated-laplace"])
def test_kept_traces_within_their_rounding_bound(name):
    """Every trace from the kept float16 Grams is within its bound of the float64 trace <X_i^T X_i, A^-1>, before
    and after picks; the cache holds the packed Grams in the pool's principal axes, to float16's rounding."""
    x, off = generators()[name](400, 12, 16, seed=5)
    obj = LogDetObjective(x, off, 1.0)
    kept = obj.kept_traces()
    i = 7
    X = x[off[i]:off[i + 1]].astype(np.float64)
    iu = np.triu_indices(16)
    # the pool's principal axes where its second moment is far from diagonal (a random basis), else as stored
    assert (kept.Q is not None) == (name == "rotated-laplace")
    Q = np.eye(16) if kept.Q is None else kept.Q
    assert np.abs(Q.T @ Q - np.eye(16)).max() < 1e-12
    packed = (Q.T @ X.T @ X @ Q)[iu] * np.where(iu[0] == iu[1], 1.0, 2.0)
    if kept.Q is not None:
        assert np.allclose(kept.diag[i], np.diagonal(X.T @ X), rtol=1e-6)
    # float16 over a power of two at least the row's largest entry: within u16 of each entry, 2^-25 s below 2^-14 s
    s = kept.scale[i]
    assert s >= np.abs(packed).max() > s / 2
    assert (np.abs(kept.C[i].astype(np.float64) * s - packed) <= 2.0 ** -11 * np.abs(packed) * 1.001
            + 2.0 ** -25 * s + 1e-5 * np.abs(packed)).all()
    cand = np.random.default_rng(0).permutation(400)[:300]    # any order: rows are read sorted, returned in place
    for picks in (0, 40, 120):
        while len(obj.picked) < picks:
            obj.add(len(obj.picked) * 3)
        t, err, _ = kept.traces(cand)
        exact = exact_traces(x, off, obj.Ainv.numpy())[cand]
        assert (np.abs(t - exact) <= err).all()
        assert (err > 0).all()


@pytest.mark.parametrize("name", ["random-scales", "rotated-laplace"])
def test_trace_bound_is_far_narrower_than_gershgorin(name):
    """Issue 25's pool: a few weak directions keep ||A^-1|| near 1/lam while the traces shrink, so the Gershgorin
    bound u ||X_i||^2 ||A^-1|| is as large as the gains; the diagonal-scaled bound stays near u16 t. The same in a
    random basis (rotated-laplace), where the stored Grams' entries cancel to ~1/2,000 of their sum against
    |A^-1|: the screen works in the pool's principal axes (6.5 t in the stored basis)."""
    x, off = generators()[name](600, 32, 64, seed=1)
    obj = LogDetObjective(x, off, 1.0)
    for i in range(0, 200, 2):
        obj.add(i)
    cand = np.arange(200, 600)
    t, err, _ = obj.kept_traces().traces(cand)
    gershgorin = 1.2e-7 * (32 + 2080 / 8 + obj.kappa) * obj.sq_norms[cand] * obj.ainv_bound
    assert np.median(gershgorin / err) > 20
    # float16's rounding, u16 rho w (rho = 2 here, after 100 picks of 32 tokens), is the bound's main term
    assert np.median(err / t) < 2.5e-3


@pytest.mark.parametrize("name", ["random-scales", "heavy-tailed", "bench"])
def test_float32_gains_within_the_scaled_margin(name):
    """The float32 screen's margin with the scaled norm (never wider than ||X_i||^2 ||A^-1||) still holds every
    float32 gain within half of it of the float64 gain; on random scales it is narrower."""
    x, off = generators()[name](600, 32, 64, seed=2)
    obj = LogDetObjective(x, off, 1.0)
    cand, eps = screened_after_picks(obj, 240)
    t, err, _ = obj.kept_traces().traces(cand)
    unscaled = obj.margin(cand, t + err)
    assert (eps <= unscaled * (1 + 1e-12)).all()
    if name == "random-scales":
        assert np.median(unscaled / eps) > 1.5   # 1.8 here, where the sqrt(L) + 1 term weighs in


def test_perron_bound_never_below_the_largest_eigenvalue():
    """Collatz-Wielandt: a warm-started bound stays an upper bound as the matrix drifts between calls, including
    a block M decouples (its part of v shrinks by the other block's eigenvalue at every step) and one it couples
    back in; it is never above the largest row sum and ends within a few percent of eigvalsh."""
    rng = np.random.default_rng(3)
    bound = PerronBound()
    d = 24
    base = np.abs(rng.normal(size=(d, d))) * 0.05
    base = (base + base.T) / 2
    for call in range(400):
        M = base * (1 + 0.01 * call) + np.eye(d)
        M[:8, 8:] = M[8:, :8] = 0.0 if call < 300 else 1e-3   # decoupled for 300 calls, then coupled again
        M[8:, 8:] *= 5.0
        exact = float(np.linalg.eigvalsh(M)[-1])
        got = bound(M)
        assert exact <= got <= M.sum(1).max() * (1 + 1e-9) + 1e-12
    assert got <= exact * 1.05
    rho = diagonal_scaled_norm(np.diag([1.0, 2.0]) + 0.5, bound=PerronBound())   # [[1.5, .5], [.5, 2.5]] scaled
    assert rho == pytest.approx(np.linalg.eigvalsh(np.array([[1, .5 / np.sqrt(3.75)], [.5 / np.sqrt(3.75), 1]]))[-1],
                                rel=1e-6)
