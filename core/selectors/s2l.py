"""S2L (SmallToLarge, Yang et al., NeurIPS 2024): cluster proxy loss trajectories, fill the budget cluster by cluster.

1. `kmeans` (torch, k-means++ init, seeded) on the trajectories: row i is example i's mean loss at each
   of the T proxy checkpoints. Raw losses by default: the official `get_trajectories.py` saves the raw
   per-example `model(..., labels=...).loss` of each checkpoint and neither it nor the paper describes a
   normalization step; `normalize="zscore"` standardizes each checkpoint column first (an option, not S2L).
2. `fill_budget_by_clusters` (Algorithm 1 of the paper): clusters from smallest to largest; each remaining
   cluster gets an equal share of what is left of the budget (rounded up, so with fewer picks than clusters
   the smallest clusters are the ones covered); a cluster smaller than its share is taken whole and the
   rest flows to the larger clusters; inside a cluster the picks are a seeded uniform random sample.

Token budget: the same water-filling in loss tokens. Clusters go from the smallest token mass up; each gets
an equal share of the tokens left; inside a cluster its seeded random order is walked and an example is taken
when it still fits the cluster's share (a longer one is skipped, like `fill_in_order`). What the clusters
leave unused (granularity) is topped up at the end from the unpicked examples in a seeded random order, as
long as they fit. With both limits set, each cluster's share holds in both.

With a target (`selection.target`, requirement `target_trajectories`: the target's records' losses at the same
proxy checkpoints), each target example is assigned to its nearest K-means centre (after the pool's
normalization) and a cluster's weight is how many target examples it received. `target_share` of the budget is
then water-filled over the clusters with weight > 0 as above, except that each remaining cluster's share of
what is left is in proportion to its weight (smallest cluster first, a cluster smaller than its share taken
whole and the rest flowing on); equal weights are exactly Algorithm 1. What that leaves of the whole budget
(the rest of the share, or target clusters too small to hold it) is filled by Algorithm 1 over the unpicked
examples of every cluster. Without a target nothing of this runs: the picks are those of Algorithm 1.

`stratify=True` (for pools such as MathInstruct, whose `source` field names the sub-data set; the official
code keeps that field for this purpose): the budget is split across `source` values in proportion to their size (largest-remainder rounding;
token mass for a token budget), then S2L fills each source's quota from that source's members, clustered
once over the whole pool (cluster ids stay comparable across sources).
"""
from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from sftcurate.core.selectors.base import (
    EXAMPLES, TRAJECTORIES, Budget, BudgetError, Selector, SelectionResult, SelectorInputs, SelectorParamError,
    SelectorParams, register,
)
from sftcurate.core.target import TARGET_TRAJECTORIES, TargetError


# ---------------------------------------------------------------- k-means

def kmeans(x, k: int, seed: int = 0, iters: int = 100, n_init: int = 3,
           chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means with k-means++ seeding, in torch (float64, CPU), deterministic for a seed.

    `n_init` seeded restarts (one generator, drawn in sequence), the lowest inertia wins. `k` is clamped to the
    number of rows; empty clusters keep their centre and are dropped at the end, so the labels are 0..k'-1
    (k' <= k) with every label used. Returns (labels int64 [N], centres float32 [k', d]).
    """
    xt = torch.as_tensor(np.asarray(x), dtype=torch.float64)
    if xt.ndim == 1:
        xt = xt[:, None]
    n = xt.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64), np.zeros((0, xt.shape[1]), dtype=np.float32)
    k = max(1, min(int(k), n))
    gen = torch.Generator().manual_seed(int(seed))
    sq = (xt * xt).sum(1)

    def dist2(centres):  # squared distances [n, c], in row chunks
        c2 = (centres * centres).sum(1)
        out = torch.empty((n, centres.shape[0]), dtype=torch.float64)
        for s in range(0, n, chunk):
            out[s:s + chunk] = (sq[s:s + chunk, None] - 2 * xt[s:s + chunk] @ centres.T + c2[None]).clamp_min_(0)
        return out

    def one_run():
        # k-means++: first centre uniform, then proportional to squared distance to the nearest chosen centre
        idx = [int(torch.randint(n, (1,), generator=gen))]
        closest = dist2(xt[idx])[:, 0]
        for _ in range(1, k):
            total = float(closest.sum())
            if total <= 0:  # every point coincides with a centre: further centres would be duplicates
                break
            nxt = int(torch.multinomial(closest / total, 1, generator=gen))
            idx.append(nxt)
            closest = torch.minimum(closest, dist2(xt[nxt:nxt + 1])[:, 0])
        centres = xt[idx].clone()
        d = dist2(centres)
        labels = d.argmin(1)
        for _ in range(iters):
            sums = torch.zeros_like(centres).index_add_(0, labels, xt)
            counts = torch.bincount(labels, minlength=centres.shape[0]).to(torch.float64)
            filled = counts > 0
            centres[filled] = sums[filled] / counts[filled, None]
            d = dist2(centres)
            new = d.argmin(1)
            if torch.equal(new, labels):
                break
            labels = new
        return float(d.gather(1, labels[:, None]).sum()), labels, centres

    best = None
    for _ in range(max(1, int(n_init))):
        run = one_run()
        if best is None or run[0] < best[0]:
            best = run
    _, labels, centres = best
    used = torch.unique(labels)
    remap = torch.full((centres.shape[0],), -1, dtype=torch.long)
    remap[used] = torch.arange(len(used))
    return remap[labels].numpy().astype(np.int64), centres[used].float().numpy()


def normalize_trajectories(losses: np.ndarray, how: str, reference: np.ndarray | None = None) -> np.ndarray:
    """`losses` normalized as `how` says, with the statistics of `reference` (default: `losses` itself), so a
    target's trajectories are placed among the pool's clusters by the pool's own scale."""
    if how == "none":
        return losses
    if how == "zscore":
        reference = losses if reference is None else reference
        std = reference.std(axis=0)
        return (losses - reference.mean(axis=0)) / np.where(std > 0, std, 1.0)
    raise ValueError(f"s2l: param 'normalize' must be 'none' or 'zscore', got '{how}'")


def target_weights(target: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """How many target rows fall nearest each centre (int64 [k]); ties go to the lower centre."""
    target = np.asarray(target, dtype=np.float64)
    centres = np.asarray(centres, dtype=np.float64)
    dist = ((target[:, None, :] - centres[None, :, :]) ** 2).sum(-1)
    return np.bincount(dist.argmin(1), minlength=len(centres)).astype(np.int64)


# ---------------------------------------------------------------- budget filling

def _as_budget(budget) -> Budget:
    return budget if isinstance(budget, Budget) else Budget(examples=int(budget))


def _s2l_fill(members_by_cluster: list[np.ndarray], budget: Budget, rng: np.random.Generator,
              token_counts: np.ndarray, weights: list[int] | None = None) -> list[int]:
    """Algorithm 1 on given clusters (lists of example indices); returns picks in pick order. With `weights`
    (positive integers, one per cluster) each cluster's share of what is left is in proportion to its weight
    among the clusters still to fill; all weights 1 is Algorithm 1 itself (integer arithmetic, same picks)."""
    by_tokens = budget.tokens is not None
    mass = [int(token_counts[m].sum()) if by_tokens else len(m) for m in members_by_cluster]
    order = sorted(range(len(members_by_cluster)), key=lambda c: (mass[c], len(members_by_cluster[c]), c))
    weights = [1] * len(members_by_cluster) if weights is None else [int(w) for w in weights]
    weight_left = sum(weights)
    left_ex = budget.examples
    left_tok = budget.tokens
    picked: list[int] = []
    perms = {c: rng.permutation(members_by_cluster[c]) for c in order}   # one draw per cluster, in cluster order
    for j, c in enumerate(order):
        share_ex = -(-left_ex * weights[c] // weight_left) if left_ex is not None else None   # rounded up
        share_tok = left_tok * weights[c] // weight_left if left_tok is not None else None
        weight_left -= weights[c]
        if share_tok is not None and j == len(order) - 1:
            share_tok = left_tok
        taken, used = 0, 0
        for i in perms[c]:
            if share_ex is not None and taken >= share_ex:
                break
            n = int(token_counts[i])
            if share_tok is not None and used + n > share_tok:
                continue
            picked.append(int(i))
            taken += 1
            used += n
        if left_ex is not None:
            left_ex -= taken
        if left_tok is not None:
            left_tok -= used
    if by_tokens:  # top up what granularity left unused, in a seeded random order
        chosen = set(picked)
        rest = np.array([i for c in order for i in perms[c] if int(i) not in chosen], dtype=np.int64)
        for i in rng.permutation(rest) if len(rest) else []:
            n = int(token_counts[i])
            if left_ex is not None and left_ex <= 0:
                break
            if n <= left_tok:
                picked.append(int(i))
                left_tok -= n
                if left_ex is not None:
                    left_ex -= 1
    return picked


def proportional_quotas(sizes: dict[str, int], total: int) -> dict[str, int]:
    """Split `total` across groups in proportion to `sizes`, largest remainder first (ties by name)."""
    whole = sum(sizes.values())
    if whole == 0:
        return {g: 0 for g in sizes}
    raw = {g: total * s / whole for g, s in sizes.items()}
    quotas = {g: min(sizes[g], int(math.floor(v))) for g, v in raw.items()}
    extra = total - sum(quotas.values())
    for g in sorted(sizes, key=lambda g: (-(raw[g] - math.floor(raw[g])), g)):
        if extra <= 0:
            break
        if quotas[g] < sizes[g]:
            quotas[g] += 1
            extra -= 1
    return quotas


def _fill_inputs(labels, budget, seed: int, token_counts):
    """(budget, labels, token counts, rng) of a fill, the budget checked against the pool."""
    budget = _as_budget(budget)
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    token_counts = np.ones(n, dtype=np.int64) if token_counts is None else np.asarray(token_counts, dtype=np.int64)
    budget.check(n, int(token_counts.sum()))
    return budget, labels, token_counts, np.random.default_rng(seed)


def _spent(budget: Budget) -> bool:
    """Nothing left to fill: a set bound at or below zero."""
    return (budget.examples is not None and budget.examples <= 0) or (budget.tokens is not None and budget.tokens <= 0)


def fill_budget_by_clusters(labels: np.ndarray, budget, seed: int, token_counts: np.ndarray | None = None,
                            strata: np.ndarray | list | None = None) -> list[int]:
    """S2L's budget filling (see the module docstring). `budget`: a Budget or a number of examples.

    Returns pool indices in pick order (cluster by cluster, smallest cluster first; per stratum when
    `strata` is given). Deterministic for a seed.
    """
    budget, labels, token_counts, rng = _fill_inputs(labels, budget, seed, token_counts)
    n = len(labels)

    def clusters_of(idx: np.ndarray) -> list[np.ndarray]:
        return [idx[labels[idx] == c] for c in np.unique(labels[idx])]

    if strata is None:
        return _s2l_fill(clusters_of(np.arange(n)), budget, rng, token_counts)
    strata = np.asarray(strata, dtype=object)
    groups = sorted(set(strata.tolist()))
    members = {g: np.flatnonzero(strata == g) for g in groups}
    ex_q = proportional_quotas({g: len(members[g]) for g in groups}, budget.examples) \
        if budget.examples is not None else None
    tok_q = proportional_quotas({g: int(token_counts[members[g]].sum()) for g in groups}, budget.tokens) \
        if budget.tokens is not None else None
    picked: list[int] = []
    for g in groups:
        sub = Budget(examples=ex_q[g] if ex_q else None, tokens=tok_q[g] if tok_q else None)
        if _spent(sub):
            continue
        picked.extend(_s2l_fill(clusters_of(members[g]), sub, rng, token_counts))
    return picked


def fill_toward_target(labels: np.ndarray, weights: np.ndarray, budget, seed: int,
                       token_counts: np.ndarray | None = None, share: float = 1.0) -> list[int]:
    """S2L's filling aimed at a target (module docstring): `share` of the budget over the clusters with weight
    > 0 (`weights[c]`: target examples nearest centre c), each in proportion to its weight; what is left of the
    budget by Algorithm 1 over every cluster's unpicked examples. Returns pool indices in pick order."""
    budget, labels, token_counts, rng = _fill_inputs(labels, budget, seed, token_counts)
    n = len(labels)
    aimed = [int(c) for c in np.unique(labels) if c < len(weights) and weights[c] > 0]
    part = Budget(examples=None if budget.examples is None else int(round(budget.examples * share)),
                  tokens=None if budget.tokens is None else int(budget.tokens * share))
    picked: list[int] = []
    if aimed and not _spent(part):
        picked = _s2l_fill([np.flatnonzero(labels == c) for c in aimed], part, rng, token_counts,
                           weights=[int(weights[c]) for c in aimed])
    rest = Budget(examples=None if budget.examples is None else budget.examples - len(picked),
                  tokens=None if budget.tokens is None else budget.tokens - int(token_counts[picked].sum()))
    if _spent(rest):
        return picked
    unpicked = np.setdiff1d(np.arange(n), np.asarray(picked, dtype=np.int64))
    clusters = [unpicked[labels[unpicked] == c] for c in np.unique(labels[unpicked])]
    return picked + _s2l_fill(clusters, rest, rng, token_counts)


# ---------------------------------------------------------------- the selector

class S2LParams(SelectorParams):
    clusters: int = Field(100, ge=1, description="K-means clusters (the paper's 100 suits pools of many thousands)")
    seed: int | None = Field(None, description="K-means and fill seed; none: the selection seed")
    stratify: bool = Field(False, description="balance the budget across the pool's `source` first")
    normalize: Literal["none", "zscore"] = Field(
        "none", description="none: raw losses as in the paper; zscore: per checkpoint")
    iters: int = Field(100, gt=0, description="Lloyd iterations per K-means start")
    n_init: int = Field(3, gt=0, description="K-means restarts (the best inertia is kept)")
    target_share: float = Field(
        1.0, ge=0, le=1, description="with a target (selection.target): the share of the budget spread over the "
        "clusters its examples fall into, in proportion to how many; the rest as without a target")


@register
class S2LSelector(Selector):
    """S2L: K-means on proxy loss trajectories, the budget filled smallest cluster first (needs --trajectories)."""

    name = "s2l"
    requires = (EXAMPLES, TRAJECTORIES)
    Params = S2LParams

    @classmethod
    def requirements(cls, target: bool = False) -> tuple[str, ...]:
        # the pool's trajectories first: they train the proxy the target's losses are read with
        return cls.requires + ((TARGET_TRAJECTORIES,) if target else ())

    def select(self, inputs: SelectorInputs, budget: Budget, seed: int) -> SelectionResult:
        if inputs.trajectories is None:
            raise BudgetError("s2l: no loss trajectories; the selector needs the 'trajectories' input")
        losses, steps = inputs.trajectories
        losses = np.asarray(losses, dtype=np.float64)
        if losses.shape[0] != inputs.size:
            raise ValueError(f"s2l: trajectories have {losses.shape[0]} rows but the pool has {inputs.size} examples")
        p = self.params
        seed = int(seed if p.seed is None else p.seed)
        budget.check(inputs.size, int(np.asarray(inputs.token_counts).sum()))
        labels, centres = kmeans(normalize_trajectories(losses, p.normalize), int(p.clusters), seed=seed,
                                 iters=int(p.iters), n_init=int(p.n_init))
        target = self._target(inputs, losses, steps)
        strata, aimed = None, {}
        if p.stratify:
            if target is not None:
                raise SelectorParamError("params.s2l.stratify: a target decides where the budget goes; unset "
                                         "stratify or selection.target")
            if "source" not in inputs.pool.column_names:
                raise ValueError("s2l: stratify=true needs a 'source' column in the pool")
            strata = np.array(inputs.pool.column("source").to_pylist(), dtype=object)
        if target is None:
            picked = fill_budget_by_clusters(labels, budget, seed, inputs.token_counts, strata)
        else:
            weights = target_weights(target, centres)
            picked = fill_toward_target(labels, weights, budget, seed, inputs.token_counts, p.target_share)
            aimed = {"target_examples": int(len(target)), "target_share": float(p.target_share),
                     "target_weights": weights.tolist(),
                     "picks_in_target_clusters": int((weights[labels[picked]] > 0).sum()) if picked else 0}
        sizes = np.bincount(labels, minlength=len(centres))
        per_cluster = np.bincount(labels[picked], minlength=len(centres)) if picked else np.zeros(len(centres), int)
        return SelectionResult(
            indices=picked,
            clusters=[int(labels[i]) for i in picked],
            info={"clusters_requested": int(p.clusters), "clusters": int(len(centres)),
                  "checkpoints": int(losses.shape[1]), "steps": [int(s) for s in np.asarray(steps)],
                  "normalize": p.normalize, "stratify": bool(p.stratify), "seed": seed,
                  "clusters_covered": int((per_cluster > 0).sum()),
                  "smallest_cluster": int(sizes.min()) if len(sizes) else 0,
                  "largest_cluster": int(sizes.max()) if len(sizes) else 0,
                  "cluster_sizes": sizes.tolist(), "picks_per_cluster": per_cluster.tolist(), **aimed},
        )

    def _target(self, inputs: SelectorInputs, losses: np.ndarray, steps) -> np.ndarray | None:
        """The target's trajectories normalized like the pool's, or None without a target; checked to come
        from the same proxy checkpoints."""
        if TARGET_TRAJECTORIES not in inputs.extra:
            return None
        target, target_steps = inputs.extra[TARGET_TRAJECTORIES]
        target = np.asarray(target, dtype=np.float64)
        if target.ndim != 2 or target.shape[0] == 0:
            raise TargetError(f"s2l: the target's trajectories hold no example (shape {target.shape}); give "
                              "target records with responses")
        target_steps, steps = np.asarray(target_steps).tolist(), np.asarray(steps).tolist()
        if target_steps != steps or target.shape[1] != losses.shape[1]:
            raise TargetError(f"s2l: the target's trajectories are at steps {target_steps} but the pool's at "
                              f"{steps}; compute both with the same proxy")
        return normalize_trajectories(target, self.params.normalize, reference=losses)
