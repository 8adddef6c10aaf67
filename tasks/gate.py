"""Prefect tasks of the quality gate (`selection.gate`, `core.gate`): score the pool, then the gated examples
artifact that every later stage of the curate flow reads."""
from __future__ import annotations

from sftcurate.core import gate_scores
from sftcurate.core.config import CurateConfig
from sftcurate.tasks.common import call, stage_task
from sftcurate.tasks.curate import produce


@stage_task("gate-scores")
def gate_target_loss_task(examples_uri: str, cfg: CurateConfig) -> str:
    return gate_scores.gate_on_target_loss(examples_uri, cfg.selection.gate, cfg.models.target,
                                           cfg.models.max_length, cfg.embedding.batch_tokens)


@stage_task("gate-scores")
def gate_askllm_task(examples_uri: str, cfg: CurateConfig) -> str:
    return gate_scores.gate_on_askllm(examples_uri, cfg.selection.gate, cfg.models.target,
                                      cfg.embedding.batch_tokens, cfg.models.max_length)


@stage_task("gate-scores")
def gate_trajectories_task(examples_uri: str, cfg: CurateConfig, trajectories_uri: str) -> str:
    return gate_scores.gate_on_trajectories(examples_uri, cfg.selection.gate, trajectories_uri)


@stage_task("gated-pool")
def gated_examples_task(examples_uri: str, gate_uri: str) -> str:
    return gate_scores.gated_examples(examples_uri, gate_uri)


def gate_pool(examples_uri: str, cfg: CurateConfig, run_id: str | None) -> str:
    """The gated examples artifact of the pool: scores (the target's losses or Ask-LLM answers, or the S2L
    proxy's trajectories on the whole pool), then the pool without its worst `selection.gate.drop` share."""
    if cfg.selection.gate.score == "target_loss":
        gate_uri = call(gate_target_loss_task, examples_uri, cfg)
    elif cfg.selection.gate.score == "askllm":
        gate_uri = call(gate_askllm_task, examples_uri, cfg)
    else:
        gate_uri = call(gate_trajectories_task, examples_uri, cfg, produce("trajectories", examples_uri, cfg, run_id))
    return call(gated_examples_task, examples_uri, gate_uri)


__all__ = ["gate_pool", "gate_target_loss_task", "gate_askllm_task", "gate_trajectories_task", "gated_examples_task"]
