"""The quality gate (`selection.gate`): drop the worst share of the pool by a score before any selector runs,
so that "is it the gate or the selector?" can be answered by running `uniform` behind the same gate.

Scores (higher is worse; computed in `core.gate_scores`, an artifact of their own):
  - `target_loss`: the target model's mean loss per loss token of the example (garbage, truncated or
    mismatched answers are surprising to the model the user fine-tunes);
  - `proxy_final_loss`: the S2L proxy's loss at its last checkpoint (what the proxy never learned);
  - `proxy_not_falling`: the proxy's loss at its last checkpoint minus its first (an example whose loss does not
    fall while the proxy trains on the pool is noise to it).

This module is light (the config imports it): the typed parameters, the drop rule and the restriction of a
selector's inputs to the kept examples.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from sftcurate.core.selectors.base import SelectionResult, SelectorInputs

GateScore = Literal["target_loss", "proxy_final_loss", "proxy_not_falling"]


class GateConfig(BaseModel):
    """`selection.gate`: drop the worst `drop` share of the pool by `score` before selecting."""

    model_config = ConfigDict(extra="forbid")

    score: GateScore = Field("target_loss", description="target_loss (the target model's mean loss per loss token), "
                             "proxy_final_loss (the S2L proxy's last-checkpoint loss) or proxy_not_falling (its "
                             "last-checkpoint loss minus its first)")
    drop: float = Field(0.1, gt=0, lt=1, description="share of the pool dropped: the examples with the highest "
                        "scores")


def gate_keep(scores: np.ndarray, drop: float) -> np.ndarray:
    """Boolean mask of the kept examples: all but the round(drop * N) highest scores (ties: the later index is
    dropped first, so the rule is deterministic). A non-finite score counts as the worst."""
    scores = np.asarray(scores, dtype=np.float64)
    n = len(scores)
    n_drop = min(int(round(drop * n)), n - 1) if n else 0
    worst_first = np.lexsort((-np.arange(n), -np.nan_to_num(scores, nan=np.inf, posinf=np.inf)))
    keep = np.ones(n, dtype=bool)
    keep[worst_first[:n_drop]] = False
    return keep


def restrict_inputs(inputs: SelectorInputs, kept: np.ndarray) -> SelectorInputs:
    """The selector's inputs on the kept examples only (`kept`: pool positions, ascending). Pool-aligned inputs
    are restricted (the pool, token counts, token features, trajectories, sentence embeddings, and any `extra`
    array with one row per example); what is not about the pool (the target, a model spec) is kept whole.
    Token features are gathered into memory (the kept rows only)."""
    kept = np.asarray(kept, dtype=np.int64)
    n = inputs.size
    out = SelectorInputs(pool=inputs.pool.take(kept), token_counts=np.asarray(inputs.token_counts)[kept],
                         model_spec=inputs.model_spec)
    if inputs.token_features is not None:
        features, offsets = inputs.token_features
        offsets = np.asarray(offsets, dtype=np.int64)
        lengths = np.diff(offsets)[kept]
        rows = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in kept]) if len(kept) else \
            np.zeros(0, np.int64)
        taken = features.take(rows) if not isinstance(features, np.ndarray) else features[rows]
        out.token_features = (np.asarray(taken), np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    if inputs.trajectories is not None:
        losses, steps = inputs.trajectories
        out.trajectories = (np.asarray(losses)[kept], steps)
    if inputs.sentence_embeddings is not None:
        out.sentence_embeddings = np.asarray(inputs.sentence_embeddings)[kept]
    out.extra = {name: (value[kept] if isinstance(value, np.ndarray) and value.ndim >= 1 and len(value) == n
                        else value) for name, value in inputs.extra.items()}
    return out


def in_pool_positions(result: SelectionResult, kept: np.ndarray) -> SelectionResult:
    """A selection made on the kept examples, with its picks mapped back to pool positions."""
    kept = np.asarray(kept, dtype=np.int64)
    result.indices = [int(kept[i]) for i in result.indices]
    return result
