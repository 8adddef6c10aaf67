"""The statistics of a comparison, on per-example held-out losses: means with intervals over held-out examples and
replicates, paired differences to the baseline, verdicts only where an interval excludes zero, per-group losses
and the selection's group coverage.

Inputs are arrays: `loss[r, i]` the summed token loss of held-out example i under replicate r of a cell, and
`tokens[i]` its loss-token count (the same for every cell: one held-out split, one tokenizer). A cell's loss is
token-weighted, sum(loss) / sum(tokens), as in training. An interval covers both the finite held-out set (a
bootstrap over examples) and the run-to-run noise of selection and fine-tuning seeds (the spread over
replicates); a paired difference subtracts the baseline example by example and replicate by replicate
(replicate r of both shares its fine-tuning seed), which removes the noise they share.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LEVEL = 0.95
MIN_GROUP_EXAMPLES = 5  # a bootstrap over fewer held-out examples of one group has no width worth reporting


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float

    @property
    def width(self) -> float:
        return self.high - self.low


def _check(loss: np.ndarray, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    loss = np.atleast_2d(np.asarray(loss, dtype=np.float64))
    tokens = np.asarray(tokens, dtype=np.float64)
    if loss.shape[1] != tokens.shape[0]:
        raise ValueError(f"{loss.shape[1]} held-out examples in the losses but {tokens.shape[0]} token counts")
    return loss, tokens


def token_mean(loss: np.ndarray, tokens: np.ndarray) -> float:
    """Token-weighted mean loss, averaged over replicates."""
    loss, tokens = _check(loss, tokens)
    return float(np.mean(loss.sum(axis=1) / max(tokens.sum(), 1.0)))


def bootstrap(loss: np.ndarray, tokens: np.ndarray, n_boot: int = 2000, seed: int = 0,
              level: float = LEVEL) -> Interval:
    """Mean token-weighted loss over replicates with a `level` interval that adds the two independent sources
    of noise: which held-out examples were drawn (a bootstrap over examples of the replicate-averaged mean) and
    which seeds were drawn (the spread of the R replicate means, with Student's t at R-1 degrees of freedom, so
    two replicates give a wide interval and more replicates a narrower one). Pass a difference of two cells'
    losses (same examples, paired replicates) to get the interval of the difference."""
    loss, tokens = _check(loss, tokens)
    n = loss.shape[1]
    per_rep = loss.sum(axis=1) / max(tokens.sum(), 1.0)
    rng = np.random.default_rng(seed)
    averaged = loss.mean(axis=0)
    boots = np.empty(n_boot)
    for b in range(n_boot):
        idx = rng.integers(n, size=n)
        boots[b] = averaged[idx].sum() / max(tokens[idx].sum(), 1.0)
    return _interval(per_rep, boots, level)


def _interval(per_rep: np.ndarray, boots: np.ndarray, level: float) -> Interval:
    """The mean of the replicate values `per_rep` with a `level` interval adding the bootstrap's variance over
    held-out examples (`boots`) and the seeds' (their spread, Student's t at R-1 degrees of freedom)."""
    from scipy import stats  # deferred on purpose: scipy.stats (hundreds of modules), for an interval only

    n_rep, mean = len(per_rep), float(per_rep.mean())
    variance = float(boots.var(ddof=1)) + (float(per_rep.var(ddof=1)) / n_rep if n_rep > 1 else 0.0)
    q = stats.t.ppf(0.5 + level / 2, n_rep - 1) if n_rep > 1 else stats.norm.ppf(0.5 + level / 2)
    half = float(q * np.sqrt(variance))
    return Interval(mean, mean - half, mean + half)


def paired_difference(loss: np.ndarray, baseline: np.ndarray, tokens: np.ndarray, n_boot: int = 2000,
                      seed: int = 0, level: float = LEVEL) -> Interval:
    """Interval of (method - baseline) token-weighted loss; negative means the method's loss is lower."""
    loss, tokens = _check(loss, tokens)
    baseline, _ = _check(baseline, tokens)
    reps = min(loss.shape[0], baseline.shape[0])
    return bootstrap(loss[:reps] - baseline[:reps], tokens, n_boot, seed, level)


def group_difference(loss: np.ndarray, baseline: np.ndarray, tokens: np.ndarray, groups: list[str], group: str,
                     n_boot: int = 2000, seed: int = 0, level: float = LEVEL,
                     min_examples: int = MIN_GROUP_EXAMPLES) -> Interval | None:
    """The paired difference on one group's held-out examples: with `group` the baseline's worst group (fixed
    before the method is looked at), this tests "better on the worst group". None when the group has fewer
    than `min_examples` held-out examples: the interval would only show the seed noise of one or two texts."""
    if group not in testable_groups(groups, min_examples):
        return None
    mask = np.asarray(groups, dtype=object) == group
    loss, tokens = _check(loss, tokens)
    baseline, _ = _check(baseline, tokens)
    return paired_difference(loss[:, mask], baseline[:, mask], tokens[mask], n_boot, seed, level)


def verdict(diff: Interval, replicates: int = 2) -> str:
    """For a loss difference: "better" when the whole interval is below 0, "worse" when above, else no call.
    With one replicate the interval cannot cover seed noise, so nothing is called."""
    if replicates < 2:
        return "not called (1 replicate)"
    if diff.high < 0:
        return "better"
    if diff.low > 0:
        return "worse"
    return "no difference"


def group_losses(loss: np.ndarray, tokens: np.ndarray, groups: list[str]) -> dict[str, float]:
    """Token-weighted loss per group (averaged over replicates)."""
    loss, tokens = _check(loss, tokens)
    groups_arr = np.asarray(groups, dtype=object)
    out = {}
    for g in sorted(set(groups)):
        mask = groups_arr == g
        out[g] = token_mean(loss[:, mask], tokens[mask])
    return out


def worst_group(per_group: dict[str, float], among: set[str] | None = None) -> tuple[str | None, float | None]:
    """The group with the highest loss (of the groups `among`, when given)."""
    losses = {g: v for g, v in per_group.items() if among is None or g in among}
    if not losses:
        return None, None
    g = max(losses, key=losses.get)
    return g, losses[g]


def testable_groups(groups: list[str], min_examples: int = MIN_GROUP_EXAMPLES) -> set[str]:
    """The groups with enough held-out examples for a paired interval of their own."""
    names, counts = np.unique(np.asarray(groups, dtype=object), return_counts=True)
    return {str(g) for g, c in zip(names, counts) if c >= min_examples}


def coverage(picked_groups: list[str], pool_groups: list[str]) -> dict:
    """How a selection covers the pool's groups: groups with at least one pick, and how far the picks' group
    shares are from the pool's (total variation distance: 0 = the pool's mix, 1 = disjoint)."""
    pool = np.asarray(pool_groups, dtype=object)
    picks = np.asarray(picked_groups, dtype=object)
    names = sorted(set(pool_groups))
    pool_share = np.array([(pool == g).mean() for g in names]) if len(pool) else np.zeros(0)
    pick_share = np.array([(picks == g).mean() for g in names]) if len(picks) else np.zeros(len(names))
    return {"groups": len(names), "groups_covered": int(sum(1 for g in names if (picks == g).any())),
            "share_distance": float(0.5 * np.abs(pick_share - pool_share).sum()) if names else 0.0,
            "picks_per_group": {g: int((picks == g).sum()) for g in names}}


# ---------------------------------------------------------------- the balanced target and answer checks

def balanced_per_replicate(loss: np.ndarray, tokens: np.ndarray, groups: list[str]) -> np.ndarray:
    """The balanced-target loss of every replicate: the mean over groups of each group's token-weighted loss, so
    every group weighs the same whatever its share of the held-out set (or of the pool)."""
    loss, tokens = _check(loss, tokens)
    g = np.asarray(groups, dtype=object)
    per_group = [loss[:, g == name].sum(axis=1) / max(tokens[g == name].sum(), 1.0) for name in sorted(set(groups))]
    return np.mean(per_group, axis=0)


def balanced_bootstrap(loss: np.ndarray, tokens: np.ndarray, groups: list[str], baseline: np.ndarray | None = None,
                       n_boot: int = 2000, seed: int = 0, level: float = LEVEL) -> Interval:
    """The balanced-target loss (or, with `baseline`, the paired difference method - baseline) with a `level`
    interval: a bootstrap that resamples held-out examples within each group (the groups are the design, each
    keeps its size) plus the spread over replicates, as `bootstrap` adds them. With the same tokens on both
    sides a difference of balanced losses is the balanced loss of the difference, as in `paired_difference`."""
    loss, tokens = _check(loss, tokens)
    if baseline is not None:
        baseline, _ = _check(baseline, tokens)
        reps = min(len(loss), len(baseline))
        loss = loss[:reps] - baseline[:reps]
    per_rep = balanced_per_replicate(loss, tokens, groups)
    averaged = loss.mean(axis=0)
    g = np.asarray(groups, dtype=object)
    members = [np.flatnonzero(g == name) for name in sorted(set(groups))]
    rng = np.random.default_rng(seed)
    boots = np.empty(n_boot)
    for b in range(n_boot):
        picks = [idx[rng.integers(len(idx), size=len(idx))] for idx in members]
        boots[b] = np.mean([averaged[p].sum() / max(tokens[p].sum(), 1.0) for p in picks])
    return _interval(per_rep, boots, level)


def rate_interval(hits: np.ndarray, baseline: np.ndarray | None = None, n_boot: int = 2000, seed: int = 0,
                  level: float = LEVEL) -> Interval:
    """A share of checked answers (`hits[r, i]` in {0, 1}), or with `baseline` the paired difference of two
    shares on the same prompts, with an interval over prompts and replicates (as `bootstrap`)."""
    hits = np.atleast_2d(np.asarray(hits, dtype=np.float64))
    if baseline is not None:
        base = np.atleast_2d(np.asarray(baseline, dtype=np.float64))
        reps = min(len(hits), len(base))
        hits = hits[:reps] - base[:reps]
    return bootstrap(hits, np.ones(hits.shape[1]), n_boot, seed, level)


def improvement_verdict(diff: Interval, replicates: int = 2) -> str:
    """`verdict` for a metric where higher is better (a share of correct answers)."""
    return verdict(Interval(-diff.mean, -diff.high, -diff.low), replicates)
