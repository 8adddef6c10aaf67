"""Targeted selection benchmark (issue 24): a pool where the target's group is 5%, features shaped like
pre-logit states (bench_fishersft's "bench" generator: per-sentence scale and topic mean, anisotropic spectrum),
the group's sentences on a topic of their own in directions the rest of the pool barely uses.

Two pools: the target spans the group's directions only (spread 0, the issue's bar), or it also varies by 0.2
outside them, as the group's own sentences do (spread 0.2). Rows, each measured in this run:
1. per method at K = the group's size: the share of picks from the target's group and the target variance
   V(picks) = trace((I + sum X^T X)^-1 C) reached: fishersft_target (naive and lazy), similarity (mean and
   round-robin), untargeted FisherSFT (lazy log-det) and uniform;
2. fishersft_target lazy vs naive: identical picks or not, evaluations, and how many stale bounds the lazy
   greedy saw grow (the objective is not submodular).

    python benchmarks/bench_targeted.py            # N=4,000, L~16, d=64 (about a minute on 2 CPU cores)
    python benchmarks/bench_targeted.py --quick    # N=600
Exit status 1 when, with the target in the group's directions only, targeted FisherSFT or similarity keeps
under 80% of its picks in the group.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sftcurate.core.fisher_target import target_second_moment, target_variance  # noqa: E402
from sftcurate.core.inputs import mean_pool  # noqa: E402
from sftcurate.core.selectors import Budget, SelectorInputs, get_selector  # noqa: E402
from sftcurate.core.target import TARGET_FEATURES  # noqa: E402


def planted(n: int, d: int, share: float, target_spread: float, seed: int = 0):
    """(pool features, offsets, group mask, target features, target offsets). The group's sentences vary by 0.2
    outside their directions; the target's by `target_spread` (0: the target spans the group's directions only)."""
    rng = np.random.default_rng(seed)
    spectrum = np.arange(1, d + 1) ** -0.5
    group = np.zeros(n, dtype=bool)
    group[rng.choice(n, int(round(n * share)), replace=False)] = True
    group_dirs = np.zeros(d)
    group_dirs[d - d // 8:] = 1.0        # the group's topic lives in the last d/8 directions
    group_topic = rng.normal(size=d) * group_dirs * 2.0

    def sentence(length: int, in_group: bool, spread: float = 0.2) -> np.ndarray:
        scale = rng.lognormal(0.0, 0.5)
        if in_group:
            z = rng.normal(size=(length, d)) * (spread * (1 - group_dirs) + group_dirs)
            return scale * (group_topic + z) * spectrum.max()
        mu = rng.normal(size=d) * 0.5 * (1 - group_dirs)
        return scale * (mu + rng.normal(size=(length, d)) * (1 - 0.9 * group_dirs)) * spectrum

    lengths = rng.integers(4, 29, n)
    rows = [sentence(int(lengths[i]), bool(group[i])) for i in range(n)]
    target = [sentence(16, True, target_spread) for _ in range(8)]
    return (np.concatenate(rows).astype(np.float32), np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            group, np.concatenate(target).astype(np.float32), np.arange(0, 16 * 8 + 1, 16, dtype=np.int64))


def one_pool(n: int, d: int, target_spread: float) -> bool:
    """Print the rows for one pool; True when a targeted method keeps under 80% of its picks in the group while
    the target spans the group's directions only (the issue's bar)."""
    features, offsets, group, target, target_offsets = planted(n, d, 0.05, target_spread)
    k = int(group.sum())
    inputs = SelectorInputs(pool=pa.table({"id": [str(i) for i in range(n)]}), token_counts=np.diff(offsets),
                            token_features=(features, offsets), sentence_embeddings=mean_pool(features, offsets))
    untargeted = SelectorInputs(pool=inputs.pool, token_counts=inputs.token_counts,
                                token_features=inputs.token_features, sentence_embeddings=inputs.sentence_embeddings)
    inputs.extra[TARGET_FEATURES] = (target, target_offsets)   # fishersft with a target aims at it: not here
    moment = target_second_moment(target)
    print(f"\npool N={n:,} ({int(offsets[-1]):,} tokens, d={d}), target's group {k} sentences (5%), K={k}, target "
          f"spread outside the group's directions {target_spread}")
    rows, failed = {}, False
    for label, method, params in (("fishersft_target naive", "fishersft_target", {"algorithm": "naive"}),
                                  ("fishersft_target lazy", "fishersft_target", {"algorithm": "lazy"}),
                                  ("similarity mean", "similarity", {"aggregate": "mean"}),
                                  ("similarity round_robin", "similarity", {"aggregate": "round_robin"}),
                                  ("uniform", "uniform", {}), ("fishersft (untargeted)", "fishersft", {})):
        start = time.perf_counter()
        result = get_selector(method, params).select(untargeted if label.endswith("(untargeted)") else inputs,
                                                     Budget(examples=k), seed=0)
        seconds = time.perf_counter() - start
        share = float(group[result.indices].mean())
        rows[label] = result
        variance = target_variance(features, offsets, moment, 1.0, result.indices)
        extra = f", bound violations seen {result.info['lazy_bound_violations']}" \
            if "lazy_bound_violations" in result.info else ""
        print(f"{label:24s} group share {share:5.0%}  target variance {variance:10.4g}  {seconds:7.2f} s{extra}")
        failed |= target_spread == 0 and method in ("fishersft_target", "similarity") and share < 0.8
    naive, lazy = rows["fishersft_target naive"], rows["fishersft_target lazy"]
    print(f"lazy vs naive: identical picks {naive.indices == lazy.indices}, variance lazy/naive "
          f"{lazy.objective / naive.objective:.6f}, evaluations {lazy.info['evaluations']:,} vs "
          f"{naive.info['evaluations']:,} (initial variance {naive.info['initial_variance']:.4g})")
    return failed


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    n, d = (600, 32) if args.quick else (4000, 64)
    failed = [one_pool(n, d, spread) for spread in (0.0, 0.2)]
    return 1 if any(failed) else 0


if __name__ == "__main__":
    sys.exit(main())
