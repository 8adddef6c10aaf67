"""FisherSFT's feature variants: what each one promises, checked on synthetic features."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sftcurate.core.fisher_greedy import run_greedy
from sftcurate.core.fisher_features import feature_diagnostics, prepare_features, second_moment
from sftcurate.core.selectors import get_selector


def pool(seed: int = 0, n: int = 60, d: int = 8):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, 9, size=n)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    scales = np.linspace(0.2, 3.0, d)  # anisotropic, like real hidden states
    x = (rng.standard_normal((offsets[-1], d)) * scales).astype(np.float32)
    x[rng.integers(0, offsets[-1], size=5)] *= 40  # a few outlier tokens
    return x, offsets


def test_defaults_leave_the_features_alone():
    x, _ = pool()
    out, lam = prepare_features(x, 1.0)
    assert out is x and lam == 1.0


def test_unit_norm_and_whitening_do_what_they_say():
    x, _ = pool()
    unit, _ = prepare_features(x, 1.0, unit_tokens=True)
    assert np.allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)
    white, _ = prepare_features(x, 1.0, whiten=True)
    assert np.allclose(second_moment(white), np.eye(x.shape[1]), atol=1e-3)


def test_relative_lam_makes_the_picks_scale_free():
    x, offsets = pool(1)
    picks = []
    for scale in (1.0, 25.0):
        feats, lam = prepare_features(x * scale, 1.0, relative_lam=True)
        picks.append(run_greedy(feats, offsets, lam=lam, k=12).picks)
    assert list(picks[0]) == list(picks[1])
    absolute = [run_greedy(x * s, offsets, lam=1.0, k=12).picks for s in (0.05, 25.0)]
    assert list(absolute[0]) != list(absolute[1])  # what relative fixes: a fixed lam depends on the scale


def test_diagnostics_see_the_outliers():
    x, offsets = pool(2)
    report = feature_diagnostics(x, offsets, lam=1.0)
    assert report["norm_max_over_median"] > 20 and report["tokens"] == offsets[-1]
    assert 1.0 <= report["effective_rank"] <= x.shape[1]


def test_unknown_variant_is_refused_where_it_enters():
    with pytest.raises(ValueError, match="token_norm"):
        get_selector("fishersft", {"token_norm": "l1"})
    with pytest.raises(ValueError, match="lam_mode"):
        get_selector("fishersft", {"lam_mode": "scaled"})


def test_variants_stream_sharded_features_to_the_same_result():
    """Memory-mapped shards (`ShardedRows`, read a block at a time) give what one in-memory array gives, and what
    the variants' formulas say, computed whole in float64."""
    from sftcurate.core.feature_rows import ShardedRows

    x, _ = pool(3)
    cuts = [0, 50, 51, 200]
    sharded = ShardedRows([x[a:b] for a, b in zip(cuts, cuts[1:] + [len(x)])], np.array(cuts))
    whole = x.astype(np.float64)
    values, vectors = np.linalg.eigh(whole.T @ whole / len(whole))
    white = whole @ (vectors / np.sqrt(values)) @ vectors.T
    expect = white / np.linalg.norm(white, axis=1, keepdims=True)
    for features in (x, sharded):
        out, lam = prepare_features(features, 2.0, unit_tokens=True, relative_lam=True, whiten=True)
        assert out.dtype == np.float32 and out.shape == x.shape
        assert np.allclose(out, expect, atol=1e-5) and lam == pytest.approx(2.0 / x.shape[1], rel=1e-5)
    offsets = pool(3)[1]
    report = feature_diagnostics(sharded, offsets, lam=1.0)
    assert report == pytest.approx(feature_diagnostics(x, offsets, lam=1.0), rel=1e-12)


# ---------------------------------------------------------------- rank-r sentence factors (issue 25, item 2)

def ragged(seed: int, n: int = 60, d: int = 8, max_len: int = 14, inner: int | None = None):
    """Sentences of 0 .. max_len tokens; with `inner`, each sentence's tokens span at most `inner` directions."""
    rng = np.random.default_rng(seed)
    feats = []
    for L in rng.integers(0, max_len, n):
        if inner is None:
            feats.append(rng.standard_normal((int(L), d)) * rng.lognormal(0, 0.5))
        else:
            feats.append(rng.standard_normal((int(L), inner)) @ rng.standard_normal((inner, d)))
    off = np.concatenate([[0], np.cumsum([len(f) for f in feats])]).astype(np.int64)
    return np.concatenate(feats).astype(np.float32), off


def gains_at(A_inv: torch.Tensor, x: np.ndarray, off: np.ndarray) -> np.ndarray:
    """log det(I + X_i A^-1 X_i^T) of every sentence, directly in float64."""
    X = torch.as_tensor(x, dtype=torch.float64)
    out = []
    for lo, hi in zip(off[:-1], off[1:]):
        Xi = X[int(lo):int(hi)]
        out.append(float(torch.logdet(torch.eye(len(Xi), dtype=torch.float64) + Xi @ A_inv @ Xi.T)) if hi > lo else 0.0)
    return np.array(out)


def test_sentence_factors_give_exact_gains_and_picks_when_rank_fits():
    from sftcurate.core.fisher import LogDetObjective
    from sftcurate.core.fisher_features import sentence_factors
    from sftcurate.core.fisher_greedy import lazy_greedy, naive_greedy

    x, off = ragged(0, inner=3)                               # every sentence of rank <= 3
    fx, foff, kept = sentence_factors(x, off, rank=4, batch_rows=40)
    lengths = np.diff(off)
    assert np.array_equal(np.diff(foff), np.minimum(lengths, 4)) and np.allclose(kept, 1.0)
    short = np.flatnonzero(lengths <= 4)
    for i in short:                                           # short sentences keep their rows as they are
        assert np.array_equal(fx[foff[i]:foff[i + 1]], x[off[i]:off[i + 1]])
    obj = LogDetObjective(x, off, 0.7)
    for i in (int(np.argmax(lengths)), 5, 17):
        A_inv = obj.Ainv.clone()
        assert np.allclose(gains_at(A_inv, fx, foff), gains_at(A_inv, x, off), rtol=1e-5, atol=1e-6)
        obj.add(i)
    tokens = naive_greedy(LogDetObjective(x, off, 0.7), token_budget=120, rule="ratio")
    factors = lazy_greedy(LogDetObjective(fx, foff, 0.7), token_budget=120, rule="ratio", costs=lengths)
    assert factors.picks == tokens.picks and np.allclose(factors.gains, tokens.gains, rtol=1e-5)


@pytest.mark.parametrize("rank", [1, 3, 5])
def test_sentence_factors_lose_at_most_the_dropped_energy_over_lam(rank):
    from sftcurate.core.fisher import LogDetObjective
    from sftcurate.core.fisher_features import sentence_factors

    x, off = ragged(1)                                        # full-rank sentences up to 13 tokens in d=8
    fx, foff, kept = sentence_factors(x, off, rank=rank, batch_rows=64)
    lengths = np.diff(off)
    assert ((kept > 0) & (kept <= 1 + 1e-12)).all() and np.allclose(kept[lengths <= rank], 1.0)
    assert (kept[lengths > rank + 2] < 1 - 1e-6).all()
    energy = np.array([float((x[off[i]:off[i + 1]].astype(np.float64) ** 2).sum()) for i in range(len(lengths))])
    lam = 0.5
    obj = LogDetObjective(x, off, lam)
    for pick in (None, 3, 11, 20):
        if pick is not None:
            obj.add(pick)
        A_inv = obj.Ainv.clone()
        exact, factored = gains_at(A_inv, x, off), gains_at(A_inv, fx, foff)
        lost = exact - factored
        assert (lost >= -1e-5).all()
        assert (lost <= (1 - kept) * energy / lam + 1e-5).all()
    with pytest.raises(ValueError, match="rank"):
        sentence_factors(x, off, rank=0)
