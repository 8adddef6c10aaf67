"""FisherSFT (Deb et al., ICML 2025): greedy log-det maximisation over per-token pre-logit features.

Needs the `token_features` artifact (features [T, d], offsets [N+1], aligned with the pool). A sentence costs
its number of feature rows (its loss tokens), so a token budget is exact. The math lives in `tasks.fisher`.
"""
from __future__ import annotations


import numpy as np

from sftcurate.core.fisher_features import prepare_features
from sftcurate.core.selectors.params import FisherSFTParams
from sftcurate.core.selectors.base import (EXAMPLES, TOKEN_FEATURES, Budget, Selector, SelectionResult, SelectorInputs,
                                  register)


@register
class FisherSFTSelector(Selector):
    name = "fishersft"
    requires = (EXAMPLES, TOKEN_FEATURES)
    Params = FisherSFTParams

    def select(self, inputs: SelectorInputs, budget: Budget, seed: int) -> SelectionResult:
        from sftcurate.core.fisher_greedy import select_from_features

        if inputs.token_features is None:
            raise ValueError("fishersft: no token features were loaded (requirement 'token_features')")
        features, offsets = inputs.token_features
        offsets = np.asarray(offsets, dtype=np.int64)
        if len(offsets) - 1 != inputs.size:
            raise ValueError(f"fishersft: token features cover {len(offsets) - 1} examples but the pool has "
                             f"{inputs.size}; re-run the embedding stage for this pool")
        p = self.params
        features, lam = prepare_features(features, p.lam, unit_tokens=p.token_norm == "unit",
                                         relative_lam=p.lam_mode == "relative", whiten=p.whiten)
        res = select_from_features(features, offsets, budget, lam=lam, algorithm=p.algorithm, seed=seed,
                                   epsilon=p.epsilon, rule=p.rule, device=p.device)
        return SelectionResult(indices=res.picks, gains=res.gains, objective=res.objective, info=res.info)
