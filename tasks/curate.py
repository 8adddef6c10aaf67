"""Prefect tasks of the `curate` flow: short calls into the library, one per stage, and `produce`, which makes
what a selector needs beyond the pool (token features, loss trajectories, ...) as each requirement's
declaration says (`core.requirements`), its shards mapped over the task runner. Nothing here is specific to
one requirement: a new one is declared in the library only."""
from __future__ import annotations

import functools

from prefect.artifacts import create_markdown_artifact

from sftcurate.core import export, ingest, selection
from sftcurate.core.config import CurateConfig, SourceConfig
from sftcurate.core.requirements import declared, requirement
from sftcurate.core.selectors.base import Budget, Step
from sftcurate.tasks.common import call, map_tasks, stage_task, task_logger


@stage_task("ingest")
def ingest_task(source: SourceConfig, source_fp: str, tokenizer_spec: str, max_length: int,
                template: str = "auto") -> str:
    return ingest.ingest(source, source_fp, tokenizer_spec, max_length, template)


@stage_task("curated-records")
def curated_task(examples_uri: str, selection_uri: str) -> str:
    """The selected records as the user gave them, in pick order (what `sftcurate export` writes out)."""
    return export.commit_curated(examples_uri, selection_uri)


@stage_task("select")
def select_task(examples_uri: str, method: str, budget: Budget, seed: int, params, input_uris: dict[str, str],
                model_spec: str | None = None) -> str:
    return selection.run_selection(examples_uri, method, budget, seed, params, input_uris, model_spec)


# ---------------------------------------------------------------- producers of a selector's inputs

@functools.lru_cache(maxsize=None)
def step_task(step: Step):
    """The Prefect task of one library call of a production, named as its declaration says (made once)."""
    return stage_task(step.task)(step.run)


def produce(name: str, examples_uri: str, cfg: CurateConfig, run_id: str | None) -> str:
    """The artifact of requirement `name` for the pool, made as its declaration (`core.requirements`) says:
    `prepare` once, the shards mapped over the flow's task runner, `commit`; a committed one is reused."""
    plan = requirement(name).produce
    if plan is None:
        raise ValueError(f"requirement '{name}' declares no production")
    prepared = None
    if plan.prepare is not None and (plan.prepare.when is None or plan.prepare.when(cfg)):
        prepared = call(step_task(plan.prepare), examples_uri, cfg, run_id)
    shard_uris = map_tasks(step_task(plan.shard), [(examples_uri, cfg, prepared, i)
                                                   for i in range(plan.shards(examples_uri, cfg))])
    uri = call(step_task(plan.commit), examples_uri, cfg, prepared, shard_uris, run_id)
    if plan.summary is not None:
        try:
            create_markdown_artifact(key=plan.summary.key, markdown=plan.summary.markdown(uri),
                                     description=plan.summary.description)
        except Exception as exc:  # the UI summary is a convenience; never fail the artifact over it
            task_logger(f"sftcurate.{name}").warning("could not create the Prefect markdown artifact: %s", exc)
    return uri


def produce_inputs(requires: tuple[str, ...], examples_uri: str, cfg: CurateConfig, run_id: str | None,
                   stage) -> dict[str, str]:
    """The committed artifact of every requirement of a selector that is made from the pool (one production
    each; one shared by two requirements is built once and then reused)."""
    uris: dict[str, str] = {}
    for needed in declared(requires):
        if needed.produce is not None:
            with stage(needed.name):
                uris[needed.name] = produce(needed.name, examples_uri, cfg, run_id)
    return uris


__all__ = ["ingest_task", "select_task", "curated_task", "produce", "produce_inputs", "step_task"]
