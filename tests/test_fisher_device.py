"""The device lazy greedy (core.fisher_device) picks exactly what the naive greedy picks. On a CPU here; the same
code runs on a GPU (benchmarks/bench_gpu.py checks the picks there too)."""
from __future__ import annotations

import numpy as np
import pytest

from sftcurate.core.fisher import LogDetObjective
from sftcurate.core.fisher_device import DeviceLogDet, device_lazy_greedy
from sftcurate.core.fisher_greedy import naive_greedy


def pool(seed: int, n: int = 150, d: int = 6, max_len: int = 9, dup: int = 20, long_every: int = 0):
    """Ragged lengths with empty sentences, exact duplicates (ties to the lowest index), and optionally some
    sentences longer than d (the d x d form)."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(0, max_len, n)
    if long_every:
        lens[::long_every] = d + 3
    feats = [rng.standard_normal((int(L), d)) * rng.lognormal(0, 0.5) for L in lens]
    for k in range(dup):
        feats[n - 1 - k] = feats[int(rng.integers(0, n // 2))].copy()
    off = np.concatenate([[0], np.cumsum([len(f) for f in feats])]).astype(np.int64)
    return np.concatenate(feats).astype(np.float32), off


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("lam", [0.5, 3.0])
def test_device_lazy_equals_naive_with_ties_and_long_sentences(seed, lam):
    x, off = pool(seed, long_every=7 if seed % 2 else 0)
    naive = naive_greedy(LogDetObjective(x, off, lam), k=40)
    lazy = device_lazy_greedy(DeviceLogDet(x, off, lam, device="cpu", refresh_every=16), k=40, block=4)
    assert lazy.picks == naive.picks
    assert np.allclose(lazy.gains, naive.gains, rtol=1e-9, atol=1e-12)
    assert lazy.objective == pytest.approx(naive.objective, rel=1e-10)
    assert lazy.evaluations < naive.evaluations


@pytest.mark.parametrize("rule", ["ratio", "gain"])
def test_device_lazy_token_budget_matches_naive(rule):
    x, off = pool(11, n=120, max_len=15)
    lens = np.diff(off)
    naive = naive_greedy(LogDetObjective(x, off, 1.0), token_budget=100, rule=rule)
    lazy = device_lazy_greedy(DeviceLogDet(x, off, 1.0, device="cpu"), token_budget=100, rule=rule, block=2)
    assert lazy.picks == naive.picks
    assert lens[lazy.picks].sum() <= 100 and lazy.info["tokens"] == lens[lazy.picks].sum()


def test_identical_sentences_and_exhausted_pool():
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.standard_normal((4, 5)).astype(np.float32)] * 6)
    off = np.arange(7, dtype=np.int64) * 4
    assert device_lazy_greedy(DeviceLogDet(x, off, 1.0, device="cpu"), k=3, block=1).picks == [0, 1, 2]
    # asking for more than the pool holds stops at the pool, as the naive greedy does
    assert device_lazy_greedy(DeviceLogDet(x, off, 1.0, device="cpu"), k=10).picks == [0, 1, 2, 3, 4, 5]


def test_device_state_tracks_the_direct_log_det():
    x, off = pool(4, dup=0)
    obj = DeviceLogDet(x, off, 2.0, device="cpu", refresh_every=3)
    res = device_lazy_greedy(obj, k=12)
    assert obj.value() - obj.initial_value() == pytest.approx(sum(res.gains), rel=1e-9)
    assert float(obj.logdet_A) == pytest.approx(obj.value(), rel=1e-9)


def test_sharded_storage_gives_the_same_picks():
    from sftcurate.core.feature_rows import ShardedRows

    x, off = pool(6)
    cut = int(off[40])
    rows = ShardedRows([x[:cut], x[cut:]], np.array([0, cut], dtype=np.int64))
    whole = device_lazy_greedy(DeviceLogDet(x, off, 1.0, device="cpu"), k=25)
    sharded = device_lazy_greedy(DeviceLogDet(rows, off, 1.0, device="cpu"), k=25)
    assert sharded.picks == whole.picks


def test_celf_passes_report_progress_under_their_own_names():
    from sftcurate.core.fisher_greedy import run_greedy
    from sftcurate.infra import progress

    x, off = pool(7, n=60)
    seen = []
    unsubscribe = progress.subscribe(lambda name, event, d: seen.append(name) if event == "step" else None)
    try:
        run_greedy(x, off, 1.0, "lazy", token_budget=60, rule="celf")
    finally:
        unsubscribe()
    assert list(dict.fromkeys(seen)) == ["greedy, CELF pass 1 of 2 (ratio rule)", "greedy, CELF pass 2 of 2 (gain rule)"]
