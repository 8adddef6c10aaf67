"""The quality gate (`selection.gate`): drop the worst share of the pool by a score before any selector runs,
so that "is it the gate or the selector?" can be answered by running `uniform` behind the same gate.

Scores (higher is worse; computed in `core.gate_scores`, an artifact of their own):
  - `target_loss`: the target model's mean loss per loss token of the example (garbage, truncated or
    mismatched answers are surprising to the model the user fine-tunes);
  - `proxy_final_loss`: the S2L proxy's loss at its last checkpoint (what the proxy never learned);
  - `proxy_not_falling`: the proxy's loss at its last checkpoint minus its first (an example whose loss does not
    fall while the proxy trains on the pool is noise to it);
  - `askllm`: 1 - P("yes") when the target model is asked whether the example is informative (Ask-LLM's
    prompt and score, `core.selectors.askllm`).

This module is light (the config imports it): the typed parameters and the drop rule. The curate flow then
commits the pool without the dropped examples (`core.gate_scores.gated_examples`), which every later stage
reads: features and trajectories are made for the kept examples only, and any selector composes with the gate.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


GateScore = Literal["target_loss", "proxy_final_loss", "proxy_not_falling", "askllm"]


class GateConfig(BaseModel):
    """`selection.gate`: drop the worst `drop` share of the pool by `score` before selecting."""

    model_config = ConfigDict(extra="forbid")

    score: GateScore = Field("target_loss", description="target_loss (the target model's mean loss per loss token), "
                             "proxy_final_loss (the S2L proxy's last-checkpoint loss), proxy_not_falling (its "
                             "last-checkpoint loss minus its first) or askllm (1 - the target model's Ask-LLM "
                             "P(yes))")
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
