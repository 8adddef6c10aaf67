"""FisherSFT (Deb et al., ICML 2025): greedy log-det maximisation over per-token pre-logit features.

Needs the `token_features` artifact (features [T, d], offsets [N+1], aligned with the pool). A sentence costs
the loss tokens its record trains on (`inputs.token_counts`), so a token budget is exact under every
`source.too_long` rule. The math lives in
`core.fisher` (the objective) and `core.fisher_greedy` (its greedy).

With a target (`selection.target`, `--target-features`) it aims at it: the sentences that most reduce the
target's predictive variance, as `fishersft_target` picks them (`core.fisher_target`), with `lam`, `rule` and
`target_algorithm`; the feature variants (token_norm, lam_mode, whiten) transform the pool's features only, so
they are refused there rather than applied to one side.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from sftcurate.core.fisher_features import prepare_features
from sftcurate.core.fisher_greedy import select_from_features
from sftcurate.core.selectors.base import (DEVICE_HELP, EXAMPLES, TOKEN_FEATURES, Budget, SelectionResult, Selector,
                                           SelectorInputs, SelectorParamError, SelectorParams, pool_token_features,
                                           register)
# the module, not its function: fisher_target imports the selectors' base, whose package imports this
# selector, so importing fisher_target first would find its function not defined yet
from sftcurate.core import fisher_target
from sftcurate.core.target import TARGET_FEATURES


class FisherSFTParams(SelectorParams):
    lam: float = Field(1.0, gt=0, description="ridge lambda of the design matrix lam*I + sum x x^T")
    algorithm: Literal["lazy", "naive", "stochastic"] = Field(
        "lazy", description="greedy variant: lazy (exactly naive's picks, faster), naive, or stochastic")
    epsilon: float = Field(0.1, gt=0, lt=1, description="stochastic greedy: sample size factor")
    rule: Literal["celf", "ratio", "gain"] = Field(
        "celf", description="under a token budget: celf (the better of ratio and gain), ratio (gain per token), "
        "or gain")
    device: str = Field("auto", description=DEVICE_HELP)
    token_norm: Literal["none", "unit"] = Field(
        "none", description="none: the paper's features; unit: every token's feature scaled to norm 1")
    lam_mode: Literal["absolute", "relative"] = Field(
        "absolute", description="absolute: lam as given; relative: lam times the features' mean variance per "
        "direction (scale-free)")
    whiten: bool = Field(False, description="whiten the features by the pool's token covariance first")
    target_algorithm: Literal["naive", "lazy"] = Field(
        "naive", description="with a target: the targeted greedy's variant (naive: exact; lazy: fewer "
        "evaluations, not always naive's picks: core/fisher_target.py)")


@register
class FisherSFTSelector(Selector):
    """FisherSFT: greedy log-det of the picked loss tokens' pre-logit features (needs --features)."""

    name = "fishersft"
    requires = (EXAMPLES, TOKEN_FEATURES)
    Params = FisherSFTParams

    @classmethod
    def requirements(cls, target: bool = False) -> tuple[str, ...]:
        # the target first: a missing or empty target stops the run before the pool is embedded
        return (EXAMPLES, TARGET_FEATURES, TOKEN_FEATURES) if target else cls.requires

    def select(self, inputs: SelectorInputs, budget: Budget, seed: int) -> SelectionResult:
        p = self.params
        if TARGET_FEATURES in inputs.extra:
            for name in ("token_norm", "lam_mode", "whiten"):
                if name in p.model_fields_set and getattr(p, name) != type(p).model_fields[name].default:
                    raise SelectorParamError(f"params.fishersft.{name}: transforms the pool's features only; with "
                                             "a target leave it at its default")
            return fisher_target.targeted_selection(inputs, budget, self.name, p.lam, p.target_algorithm, p.rule)
        features, offsets = pool_token_features(inputs, self.name)
        features, lam = prepare_features(features, p.lam, unit_tokens=p.token_norm == "unit",
                                         relative_lam=p.lam_mode == "relative", whiten=p.whiten)
        res = select_from_features(features, offsets, budget, lam=lam, algorithm=p.algorithm, seed=seed,
                                   epsilon=p.epsilon, rule=p.rule, device=p.device, costs=inputs.token_counts)
        return SelectionResult(indices=res.picks, gains=res.gains, objective=res.objective, info=res.info)
