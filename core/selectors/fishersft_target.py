"""Targeted FisherSFT: the pool sentences that most reduce the predictive variance of the target's tokens under
FisherSFT's last-layer model (a V-optimal design; the objective, its exact rank-L gains and what the lazy
greedy guarantees on it: `core.fisher_target`).

Needs the pool's `token_features` and the target's `target_features` (`selection.target`, embedded with the same
model and projection: `core.target`). A sentence costs its loss tokens, so token budgets work as FisherSFT's.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

# the module, not its function: fisher_target imports the selectors' base, whose package imports this
# selector, so importing fisher_target first would find its function not defined yet
from sftcurate.core import fisher_target
from sftcurate.core.selectors.base import (EXAMPLES, TOKEN_FEATURES, Budget, SelectionResult, Selector,
                                           SelectorInputs, SelectorParams, register)
from sftcurate.core.target import TARGET_FEATURES


class FisherSFTTargetParams(SelectorParams):
    lam: float = Field(1.0, gt=0, description="ridge lambda of the design matrix lam*I + sum x x^T")
    algorithm: Literal["naive", "lazy"] = Field(
        "naive", description="naive: the exact greedy; lazy: fewer evaluations, the same picks only while no "
        "gain grows (the objective is not submodular; see core/fisher_target.py)")
    rule: Literal["celf", "ratio", "gain"] = Field(
        "celf", description="under a token budget: celf (the better of ratio and gain), ratio (gain per token), "
        "or gain")


@register
class FisherSFTTargetSelector(Selector):
    """Targeted FisherSFT: least predictive variance of the target's tokens (needs --features, --target-features)."""

    name = "fishersft_target"
    # the target first: a missing or empty target stops the run before the pool is embedded
    requires = (EXAMPLES, TARGET_FEATURES, TOKEN_FEATURES)
    Params = FisherSFTTargetParams

    def select(self, inputs: SelectorInputs, budget: Budget, seed: int) -> SelectionResult:
        p = self.params
        return fisher_target.targeted_selection(inputs, budget, self.name, p.lam, p.algorithm, p.rule)

