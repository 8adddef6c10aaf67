"""Uniform: a seeded random sample, the baseline every method must beat."""
from __future__ import annotations

import numpy as np

from sftcurate.core.selectors.base import Budget, Selector, SelectionResult, SelectorInputs, fill_in_order, register


@register
class UniformSelector(Selector):
    """Uniform: a seeded random sample of the pool."""

    name = "uniform"

    def select(self, inputs: SelectorInputs, budget: Budget, seed: int) -> SelectionResult:
        order = np.random.default_rng(seed).permutation(inputs.size)
        return SelectionResult(indices=fill_in_order(order, inputs.token_counts, budget))
