"""The `compare` flow: prove a selection helps. For each budget x method:

    select (the curate pieces)  ->  fine-tune the target  ->  held-out loss  ->  generations
    ->  pairwise judge against Uniform at the same budget

at equal token compute (every cell of a budget trains on epochs x the budget's loss tokens), R replicates,
and the full pool as a reference; then the report of `core.report` (held-out loss with intervals, paired
differences to uniform with verdicts, worst group and coverage, win rates) as markdown, CSV, an EVAL_RESULTS
parquet and a PNG, a Prefect markdown artifact, and an MLflow parent run with one child run per cell. Every stage is an artifact keyed on its inputs and code (`infra.stages`), so adding a budget or a
method runs only what is new, and a rerun that reuses every stage reuses the report too.
"""
from __future__ import annotations

import gc
import json

import sftcurate.infra  # noqa: F401  (environment defaults before Prefect reads its settings)
from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from sftcurate.core.config import BASELINE, CompareConfig, load_compare_config  # noqa: F401  (re-exported)
from sftcurate.core.evaluate import read_eval
from sftcurate.core.finetune import finetune_meta
from sftcurate.core.ingest import examples_meta
from sftcurate.core.judge import judge_note
from sftcurate.core.report import FULL, commit_report, markdown_table, result_rows
from sftcurate.core.selection import selection_meta
from sftcurate.data_contracts.manifests import JudgeSanityMeta, JudgmentsMeta
from sftcurate.flows.curate import ingest_pool, log_datasets, select_pipeline
from sftcurate.infra import progress, tracking
from sftcurate.infra.env import ensure_home
from sftcurate.infra.runners import task_runner_from_settings
from sftcurate.infra.stages import read_meta
from sftcurate.infra.store import join, read_bytes
from sftcurate.tasks.common import call
from sftcurate.tasks.evaluate import finetune_task, generate_task, heldout_task, judge_sanity_task, judge_task
from sftcurate.tasks.gate import gate_pool
from sftcurate.tasks.links import flow_run_name, link_runs

# ---------------------------------------------------------------- report

# ---------------------------------------------------------------- the flow

def _public_params(cfg: CompareConfig) -> dict:
    d = cfg.model_dump()
    d["judge"].pop("template", None)  # long; it is in the report artifact
    return d


def run_cell(cfg: CompareConfig, method: str, budget: int, replicate: int, train_tokens: int | None,
             parent: str, timings: dict, baseline: dict | None) -> dict:
    """One cell: select, fine-tune on the budget's token compute, held-out loss; on replicate 0 also generate
    and, for a method other than uniform, judge against uniform. `train_tokens` None: uniform of an example
    budget, which fixes the budget's token compute from its own selection."""
    name = f"{method}@{budget}" + (f"#{replicate}" if replicate else "")
    selector, unit, size = method, None, budget
    if method == FULL:  # every pool example; the token compute, not the selection, is what is held equal
        selector, unit, size = BASELINE, "examples", None
    tags = {"method": method, "budget": budget, "budget_unit": cfg.budget_unit, "replicate": replicate,
            "prefect.flow": "compare"}
    with tracking.start_run(name, tags=tags, parent_run_id=parent) as child:
        with progress.stage(f"{name} select", timings):
            if size is None:
                size = pool_size(cfg)
            examples_uri, selection_uri = select_pipeline(cfg.curate_config(selector, size, replicate, unit), child)
        if train_tokens is None:
            train_tokens = round(cfg.epochs * selection_meta(selection_uri).selected_tokens)
        ft = cfg.finetune_config(train_tokens, replicate)
        with progress.stage(f"{name} finetune", timings):
            model_uri = call(finetune_task, examples_uri, selection_uri, cfg.models.target, ft, child)
        with progress.stage(f"{name} evaluate", timings):
            eval_uri = call(heldout_task, examples_uri, model_uri, cfg.models.target, cfg.models.max_length, child)
        cell = {"examples_uri": examples_uri, "selection_uri": selection_uri, "model_uri": model_uri,
                "eval_uri": eval_uri, "heldout": read_eval(eval_uri), "train_tokens": train_tokens,
                "steps_done": finetune_meta(model_uri).steps_done, "mlflow_run_id": child}
        if replicate == 0 and method != FULL:
            with progress.stage(f"{name} generate", timings):
                cell["generations_uri"] = call(generate_task, examples_uri, model_uri, cfg.models.target,
                                               cfg.generation_config(), child)
            if baseline is not None:
                with progress.stage(f"{name} judge", timings):
                    cell["judgments_uri"] = call(judge_task, cell["generations_uri"], baseline["generations_uri"],
                                                 method, BASELINE, cfg.judge, cfg.seed, child)
                cell["judge"] = read_meta(cell["judgments_uri"], JudgmentsMeta).summary
        log_cell_artifacts(child, cell)
    gc.collect()  # the cell's models go before the next cell loads its own (peft wrappers hold reference cycles)
    return cell


def log_cell_artifacts(run_id: str, cell: dict) -> None:
    """A cell's MLflow run holds what it produced, so its selection, generations and verdicts can be read there."""
    log_datasets(run_id, cell["examples_uri"], cell["selection_uri"])
    for key, name in (("selection_uri", "selection.parquet"), ("eval_uri", "losses.parquet"),
                      ("generations_uri", "generations.parquet"), ("judgments_uri", "judgments.parquet")):
        if cell.get(key):
            tracking.log_bytes(run_id, read_bytes(join(cell[key], name)), name, "cell")


def pool_size(cfg: CompareConfig) -> int:
    """Training examples of the pool every cell selects from (behind the gate, when there is one)."""
    curate = cfg.curate_config(BASELINE, 1)
    examples_uri = ingest_pool(curate)
    if curate.selection.gate is not None:
        examples_uri = gate_pool(examples_uri, curate, None)
    return examples_meta(examples_uri).n_train


@flow(name="compare", flow_run_name=flow_run_name, log_prints=True, persist_result=False,
      task_runner=task_runner_from_settings())
def compare(config: CompareConfig = CompareConfig()) -> dict:
    """Fine-tune the target on each selection (methods x budgets x replicates) at equal token compute; compare
    held-out loss (intervals, paired differences to uniform, groups) and the judge's win rate."""
    cfg = config if isinstance(config, CompareConfig) else CompareConfig.model_validate(config)
    ensure_home()
    methods = cfg.all_methods + ([FULL] if cfg.reference_full else [])
    timings: dict[str, float] = {}
    cells: dict[tuple[str, int], list[dict]] = {}
    train_tokens: dict[int, int] = {}
    tags = {"prefect.flow_run_id": str(flow_run.id or ""), "prefect.flow": "compare"}
    with tracking.start_run(cfg.name, tags=tags, params=_public_params(cfg)) as parent:
        link_runs(parent)
        for budget in cfg.budgets:
            tokens = round(cfg.epochs * budget) if cfg.budget_unit == "tokens" else None
            for method in methods:  # uniform first: its generations are what the others are judged against
                baseline = cells[(BASELINE, budget)][0] if method != BASELINE else None
                cells[(method, budget)] = [run_cell(cfg, method, budget, r, tokens, parent, timings, baseline)
                                           for r in range(cfg.replicates)]
                tokens = train_tokens[budget] = cells[(method, budget)][0]["train_tokens"]
        first = cells[(BASELINE, cfg.budgets[0])][0]
        examples_uri = first["examples_uri"]
        with progress.stage("base model", timings):
            base_uri = call(heldout_task, examples_uri, None, cfg.models.target, cfg.models.max_length, parent)
        with progress.stage("judge sanity", timings):  # known pairs: is this judge's win rate evidence at all?
            sanity_uri = call(judge_sanity_task, first["generations_uri"], cfg.judge, cfg.seed)
        sanity = read_meta(sanity_uri, JudgeSanityMeta)
        tracking.log_metrics(parent, {"judge_sanity/accuracy": sanity.accuracy,
                                      "judge_sanity/position_bias": sanity.position_bias})
        note = judge_note(cfg.judge)
        with progress.stage("report", timings):
            rows = result_rows(cfg, cells, base_uri, examples_uri, methods)
            markdown = markdown_table(cfg, rows, methods, train_tokens, note, sanity)
        summary = {
            "name": cfg.name, "mlflow_run_id": parent, "flow_run_id": str(flow_run.id or ""),
            "examples_uri": examples_uri, "methods": methods, "budgets": cfg.budgets,
            "budget_unit": cfg.budget_unit, "replicates": cfg.replicates, "train_tokens": train_tokens,
            "target_model": cfg.models.target, "base_heldout_loss": read_eval(base_uri)["loss"],
            "base_eval_uri": base_uri, "judge_backend": cfg.judge.backend, "judge_note": note,
            "judge_sanity": sanity.model_dump(include={"accuracy", "pairs", "errors", "position_bias", "trusted"}),
            "judge_sanity_uri": sanity_uri,
            "cells": {f"{m}@{b}" + (f"#{r}" if r else ""): {k: v for k, v in c.items() if k != "mlflow_run_id"}
                      for (m, b), reps in cells.items() for r, c in enumerate(reps)},
            "rows": rows,
        }
        report_uri = commit_report(cfg, rows, cells, base_uri, sanity_uri, markdown, summary, methods)
        summary.update({"report_uri": report_uri, "table_markdown": markdown, "timings": timings,
                        "mlflow_runs": {f"{m}@{b}#{r}": c["mlflow_run_id"]
                                        for (m, b), reps in cells.items() for r, c in enumerate(reps)}})
        for name in ("results.md", "results.csv", "results.parquet", "results.png"):
            tracking.log_bytes(parent, read_bytes(join(report_uri, name)), name, "report")
        tracking.log_metrics(parent, {"base_heldout_loss": summary["base_heldout_loss"], "cells": len(cells)})
        create_markdown_artifact(markdown, key="compare-results", description=f"sftcurate comparison {cfg.name}")
    return json.loads(json.dumps(summary, default=str))


__all__ = ["CompareConfig", "compare", "load_compare_config"]  # the config lives in core.config
