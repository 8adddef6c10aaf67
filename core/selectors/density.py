"""DensitySampling (Sachdeva et al., 2024, "How to Train Data-Efficient LLMs"): sample away from dense regions.

A Gaussian kernel density estimate in sentence-embedding space, score(i) = mean_j exp(-|e_i - e_j|^2 / (2 h^2)),
over all examples (exact, for N <= `exact_max`) or over a seeded random subsample of `sample` reference
points (an unbiased estimate of the same mean for large N). Examples are then drawn without replacement with
probability proportional to density^-alpha (Efraimidis-Spirakis keys Exp(1) / w, seeded), and taken in that
order while they fit the budget. Embeddings are L2-normalised first (`normalize`, default true); the
bandwidth defaults to the median pairwise distance of a sample divided by sqrt(2) (so 2h^2 = median^2).
"""
from __future__ import annotations

import numpy as np
from pydantic import Field

from sftcurate.core.selectors.base import (EXAMPLES, SENTENCE_EMBEDDINGS, Budget, Selector, SelectionResult,
                                           SelectorInputs, SelectorParams, fill_in_order, register)


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d, 0.0)


def median_bandwidth(emb: np.ndarray, rng: np.random.Generator, sample: int = 1000) -> float:
    idx = rng.choice(len(emb), size=min(sample, len(emb)), replace=False)
    d2 = _sq_dists(emb[idx], emb[idx])
    iu = np.triu_indices(len(idx), 1)
    med = float(np.sqrt(np.median(d2[iu]))) if len(iu[0]) else 1.0
    return med / np.sqrt(2.0) if med > 0 else 1.0


def kernel_density(emb: np.ndarray, bandwidth: float | None = None, seed: int = 0, exact_max: int = 8192,
                   sample: int = 4096, chunk: int = 2048) -> tuple[np.ndarray, float]:
    """(density [N], bandwidth used). Exact mean kernel for N <= exact_max, else over a random subsample."""
    emb = np.asarray(emb, dtype=np.float64)
    rng = np.random.default_rng(seed)
    h = float(bandwidth) if bandwidth else median_bandwidth(emb, rng)
    ref = emb if len(emb) <= exact_max else emb[np.sort(rng.choice(len(emb), size=sample, replace=False))]
    out = np.empty(len(emb))
    for lo in range(0, len(emb), chunk):
        out[lo:lo + chunk] = np.exp(-_sq_dists(emb[lo:lo + chunk], ref) / (2.0 * h * h)).mean(1)
    return out, h


class DensityParams(SelectorParams):
    bandwidth: float | None = Field(None, gt=0, description="kernel bandwidth; none: the median heuristic")
    alpha: float = Field(1.0, ge=0, description="sampling weight = density^-alpha")
    normalize: bool = Field(True, description="L2-normalise the embeddings first")
    exact_max: int = Field(8192, gt=0, description="exact density up to this many examples, sampled above")
    sample: int = Field(4096, gt=0, description="reference points of the sampled density")


@register
class DensitySelector(Selector):
    """DensitySampling: sample by inverse kernel density of the mean token features (needs --features)."""

    name = "density"
    requires = (EXAMPLES, SENTENCE_EMBEDDINGS)
    Params = DensityParams

    def select(self, inputs: SelectorInputs, budget: Budget, seed: int) -> SelectionResult:
        emb = inputs.sentence_embeddings
        if emb is None:
            raise ValueError("density: no sentence embeddings were loaded (requirement 'sentence_embeddings')")
        emb = np.asarray(emb, dtype=np.float64)
        if emb.ndim != 2 or emb.shape[0] != inputs.size:
            raise ValueError(f"density: embeddings have shape {emb.shape}, expected [{inputs.size}, d]")
        if not np.isfinite(emb).all():
            raise ValueError("density: embeddings contain NaN or inf")
        p = self.params
        if p.normalize:
            emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        density, h = kernel_density(emb, p.bandwidth, seed, p.exact_max, p.sample)
        alpha = p.alpha
        weights = np.maximum(density, 1e-300) ** (-alpha)
        rng = np.random.default_rng(seed)
        keys = rng.exponential(size=len(weights)) / weights     # smallest key first = weighted sample w/o replacement
        order = np.lexsort((np.arange(len(keys)), keys))
        picks = fill_in_order(order, inputs.token_counts, budget)
        return SelectionResult(indices=picks, scores=[float(density[i]) for i in picks],
                               info={"bandwidth": h, "alpha": alpha,
                                     "exact": bool(len(emb) <= p.exact_max)})
