"""Similarity (the RDS+ baseline; Ivison et al., 2025, "Large-Scale Data Selection for Instruction Tuning"):
rank the pool by the cosine of each example's mean token feature to the target's, take the top within the
budget.

Both sides are mean token features of the same model and projection (the pool's `sentence_embeddings`, the
target's `target_features`, `core.target`). `aggregate: mean` scores an example by its cosine to the mean of
the target examples' mean features; `round_robin` ranks the pool once per target example and takes each
target example's next best in turn, so that one target example cannot claim the whole budget.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from sftcurate.core.selectors.base import (EXAMPLES, SENTENCE_EMBEDDINGS, Budget, Selector, SelectionResult,
                                           SelectorInputs, SelectorParams, fill_in_order, register)
from sftcurate.core.target import TARGET_FEATURES, target_features


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to norm 1 (a zero row, an example without loss tokens, stays zero: cosine 0 to anything)."""
    vectors = np.asarray(vectors, dtype=np.float64)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def example_means(features, offsets: np.ndarray) -> np.ndarray:
    """The mean token feature of every target example that has loss tokens (a target is small: read whole)."""
    offsets = np.asarray(offsets, dtype=np.int64)
    counts = np.diff(offsets)
    rows = np.asarray(features[0:int(offsets[-1])], dtype=np.float64)
    starts = offsets[:-1][counts > 0]
    return np.add.reduceat(rows, starts, axis=0) / counts[counts > 0][:, None]


def round_robin(cosines: np.ndarray, token_counts: np.ndarray, budget: Budget) -> tuple[list[int], list[int]]:
    """cosines [N, M] (pool x target examples): each target example in turn takes its most similar example not
    yet taken that still fits. Returns (picks, the target example each was taken for)."""
    n, m = cosines.shape
    orders = [np.lexsort((np.arange(n), -cosines[:, j])) for j in range(m)]
    cursors, taken, picks, owners, used = [0] * m, np.zeros(n, dtype=bool), [], [], 0
    active = list(range(m))
    while active and (budget.examples is None or len(picks) < budget.examples):
        for j in list(active):
            if budget.examples is not None and len(picks) >= budget.examples:
                break
            order, pos = orders[j], cursors[j]
            # a candidate too long now stays too long: the token budget left only shrinks
            while pos < n and (taken[order[pos]] or not budget.fits(len(picks), used, int(token_counts[order[pos]]))):
                pos += 1
            cursors[j] = pos
            if pos >= n:
                active.remove(j)
                continue
            i = int(order[pos])
            taken[i] = True
            picks.append(i)
            owners.append(j)
            used += int(token_counts[i])
    return picks, owners


class SimilarityParams(SelectorParams):
    aggregate: Literal["mean", "round_robin"] = Field(
        "mean", description="mean: cosine to the target's mean feature; round_robin: each target example takes "
        "its most similar example in turn")


@register
class SimilaritySelector(Selector):
    """Similarity (RDS+): mean token features closest to the target's (needs --features, --target-features)."""

    name = "similarity"
    # the target first: a missing or empty target stops the run before the pool is embedded
    requires = (EXAMPLES, TARGET_FEATURES, SENTENCE_EMBEDDINGS)
    Params = SimilarityParams

    def select(self, inputs: SelectorInputs, budget: Budget, seed: int) -> SelectionResult:
        pool = inputs.sentence_embeddings
        if pool is None or pool.shape[0] != inputs.size:
            raise ValueError(f"similarity: sentence embeddings cover {0 if pool is None else pool.shape[0]} "
                             f"examples but the pool has {inputs.size}")
        features, offsets = target_features(inputs, pool.shape[1], self.name)
        target = example_means(features, offsets)
        pool = unit_rows(pool)
        if self.params.aggregate == "mean":
            centre = unit_rows(unit_rows(target).mean(0, keepdims=True))[0]
            scores = pool @ centre
            picks = fill_in_order(np.lexsort((np.arange(len(scores)), -scores)), inputs.token_counts, budget)
            return SelectionResult(indices=picks, scores=[float(scores[i]) for i in picks],
                                   info={"aggregate": "mean", "target_examples": int(len(target))})
        cosines = pool @ unit_rows(target).T
        picks, owners = round_robin(cosines, inputs.token_counts, budget)
        return SelectionResult(indices=picks, scores=[float(cosines[i, j]) for i, j in zip(picks, owners)],
                               clusters=owners, info={"aggregate": "round_robin",
                                                      "target_examples": int(len(target))})
