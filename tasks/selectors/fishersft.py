"""FisherSFT (Deb et al., ICML 2025): greedy log-det maximisation over per-token pre-logit features.

Needs the `token_features` artifact (features [T, d], offsets [N+1], aligned with the pool). A sentence costs
its number of feature rows (its loss tokens), so a token budget is exact. The math lives in `tasks.fisher`.
"""
from __future__ import annotations

import numpy as np

from tasks.selectors.base import (EXAMPLES, TOKEN_FEATURES, Budget, Selector, SelectionResult, SelectorInputs,
                                  register)


@register
class FisherSFTSelector(Selector):
    """Params: lam (ridge of the design matrix, 1.0), algorithm ("lazy" | "naive" | "stochastic"),
    epsilon (stochastic greedy, 0.1), rule under a token budget ("celf": the better of "ratio", gain per
    token, and "gain", the raw gain; or either alone),
    device ("auto" | "cpu" | "cuda")."""

    name = "fishersft"
    requires = (EXAMPLES, TOKEN_FEATURES)
    code_modules = ("tasks.fisher",)

    def select(self, inputs: SelectorInputs, budget: Budget, seed: int) -> SelectionResult:
        from tasks.fisher import select_from_features

        if inputs.token_features is None:
            raise ValueError("fishersft: no token features were loaded (requirement 'token_features')")
        features, offsets = inputs.token_features
        offsets = np.asarray(offsets, dtype=np.int64)
        if len(offsets) - 1 != inputs.size:
            raise ValueError(f"fishersft: token features cover {len(offsets) - 1} examples but the pool has "
                             f"{inputs.size}; re-run the embedding stage for this pool")
        lam = float(self.params.get("lam", 1.0))
        algorithm = str(self.params.get("algorithm", "lazy"))
        epsilon = float(self.params.get("epsilon", 0.1))
        rule = str(self.params.get("rule", "celf"))
        device = self.params.get("device", "auto")
        return select_from_features(features, offsets, budget, lam=lam, algorithm=algorithm, seed=seed,
                                    epsilon=epsilon, rule=rule, device=device)
