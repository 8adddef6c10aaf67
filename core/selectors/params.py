"""Every selector's typed parameters, apart from the selectors' math so that configuration can name them
without importing (and hashing into every stage key) the selectors themselves."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from sftcurate.core.selectors.base import SelectorParams

DEVICE = "auto (SFTCURATE_DEVICE, else cuda when available, else cpu), cpu, cuda"


class FisherSFTParams(SelectorParams):
    lam: float = Field(1.0, gt=0, description="ridge lambda of the design matrix lam*I + sum x x^T")
    algorithm: Literal["lazy", "naive", "stochastic"] = Field(
        "lazy", description="greedy variant: lazy (exactly naive's picks, faster), naive, or stochastic")
    epsilon: float = Field(0.1, gt=0, lt=1, description="stochastic greedy: sample size factor")
    rule: Literal["celf", "ratio", "gain"] = Field(
        "celf", description="under a token budget: celf (the better of ratio and gain), ratio (gain per token), "
        "or gain")
    device: str = Field("auto", description=DEVICE)
    token_norm: Literal["none", "unit"] = Field(
        "none", description="none: the paper's features; unit: every token's feature scaled to norm 1")
    lam_mode: Literal["absolute", "relative"] = Field(
        "absolute", description="absolute: lam as given; relative: lam times the features' mean variance per "
        "direction (scale-free)")
    whiten: bool = Field(False, description="whiten the features by the pool's token covariance first")


class S2LParams(SelectorParams):
    clusters: int = Field(100, ge=1, description="K-means clusters (the paper's 100 suits pools of many thousands)")
    seed: int | None = Field(None, description="K-means and fill seed; none: the selection seed")
    stratify: bool = Field(False, description="balance the budget across the pool's `source` first")
    normalize: Literal["none", "zscore"] = Field(
        "none", description="none: raw losses as in the paper; zscore: per checkpoint")
    iters: int = Field(100, gt=0, description="Lloyd iterations per K-means start")
    n_init: int = Field(3, gt=0, description="K-means restarts (the best inertia is kept)")


class DensityParams(SelectorParams):
    bandwidth: float | None = Field(None, gt=0, description="kernel bandwidth; none: the median heuristic")
    alpha: float = Field(1.0, ge=0, description="sampling weight = density^-alpha")
    normalize: bool = Field(True, description="L2-normalise the embeddings first")
    exact_max: int = Field(8192, gt=0, description="exact density up to this many examples, sampled above")
    sample: int = Field(4096, gt=0, description="reference points of the sampled density")


class AskLLMParams(SelectorParams):
    batch_tokens: int = Field(4096, gt=0, description="padded tokens per scoring batch")
    max_length: int = Field(512, gt=8, description="max prompt tokens per scored example")
    device: str = Field("auto", description=DEVICE)
