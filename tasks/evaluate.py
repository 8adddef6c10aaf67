"""Prefect tasks of the `compare` flow: fine-tune, held-out loss, generations, judge; short calls into the library."""
from __future__ import annotations

from sftcurate.core import evaluate, finetune, judge
from sftcurate.core.config import JudgeConfig
from sftcurate.core.evaluate import GenerationConfig
from sftcurate.core.finetune import FinetuneConfig
from sftcurate.infra.models import model_fingerprint
from sftcurate.tasks.common import stage_task


@stage_task("finetune")
def finetune_task(examples_uri: str, selection_uri: str, target_spec: str, cfg: FinetuneConfig,
                  run_id: str | None = None) -> str:
    return finetune.finetune(examples_uri, selection_uri, target_spec, model_fingerprint(target_spec), cfg, run_id)


@stage_task("heldout-loss")
def heldout_task(examples_uri: str, model_uri: str | None, target_spec: str, max_length: int,
                 run_id: str | None = None) -> str:
    return evaluate.evaluate_heldout(examples_uri, model_uri, target_spec, model_fingerprint(target_spec), max_length,
                                     run_id)


@stage_task("generate")
def generate_task(examples_uri: str, model_uri: str | None, target_spec: str, cfg: GenerationConfig,
                  run_id: str | None = None) -> str:
    return evaluate.generate(examples_uri, model_uri, target_spec, model_fingerprint(target_spec), cfg, run_id)


@stage_task("judge-sanity")
def judge_sanity_task(gens_uri: str, cfg: JudgeConfig, seed: int = 0) -> str:
    return judge.judge_sanity(gens_uri, cfg, seed)


@stage_task("judge")
def judge_task(gens_a_uri: str, gens_b_uri: str, method_a: str, method_b: str, cfg: JudgeConfig, seed: int = 0,
               run_id: str | None = None) -> str:
    return judge.run_judge(gens_a_uri, gens_b_uri, method_a, method_b, cfg, seed, run_id)
