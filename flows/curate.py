"""The `curate` flow: ingest -> produce what the selector needs -> select -> commit, tracked and summarised."""
from __future__ import annotations

import json

import sftcurate.infra  # noqa: F401  (environment defaults before Prefect reads its settings)
from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from sftcurate.core.config import CurateConfig
from sftcurate.core.curation_report import curation_report
from sftcurate.core.gate_scores import gate_markdown
from sftcurate.core.ingest import examples_meta, source_fingerprint
from sftcurate.core.requirements import selection_requires
from sftcurate.core.selection import binding_limit, selection_meta
from sftcurate.core.selectors.base import MODEL, Budget, BudgetError
from sftcurate.infra import progress, tracking
from sftcurate.infra.env import ensure_home
from sftcurate.infra.models import model_fingerprint
from sftcurate.infra.runners import task_runner_from_settings
from sftcurate.infra.stages import content_key
from sftcurate.infra.store import join, read_bytes
from sftcurate.tasks.common import call
from sftcurate.tasks.curate import curated_task, ingest_task, produce_inputs, select_task
from sftcurate.tasks.gate import gate_pool
from sftcurate.tasks.links import flow_run_name, link_runs


def ingest_pool(cfg: CurateConfig) -> str:
    """The examples artifact of the configured source (ingested unless it is committed)."""
    return call(ingest_task, cfg.source, source_fingerprint(cfg.source), cfg.models.target, cfg.models.max_length,
                cfg.models.template)


def selection_budget(cfg: CurateConfig) -> Budget:
    """The limits the user set: a token budget alone has no example cap (`SelectionConfig.examples_budget`)."""
    return Budget(cfg.selection.examples_budget, cfg.selection.token_budget)


def select_pipeline(cfg: CurateConfig, run_id: str | None, timings: dict | None = None) -> tuple[str, str]:
    """Ingest, produce the selector's inputs, select. Returns (examples_uri, selection_uri)."""
    timings = {} if timings is None else timings
    budget = selection_budget(cfg)
    budget.check(pool_size=2**62)  # <= 0 budgets fail before anything is read or committed
    requires = selection_requires(cfg.selection)  # with what the selector reads of a target, when one is set
    with progress.stage("ingest", timings):
        examples_uri = ingest_pool(cfg)
    if cfg.selection.gate is not None:  # every later stage reads the gated pool (core/gate.py)
        with progress.stage("gate", timings):
            examples_uri = gate_pool(examples_uri, cfg, run_id)
    meta = examples_meta(examples_uri)
    budget.check(meta.n_train, meta.train_tokens)
    input_uris = produce_inputs(requires, examples_uri, cfg, run_id, lambda name: progress.stage(name, timings))
    with progress.stage("select", timings):
        selection_uri = call(select_task, examples_uri, cfg.selection.method, budget, cfg.selection.seed,
                             cfg.selection.selector_params, input_uris,
                             cfg.models.target if MODEL in requires else None)
    return examples_uri, selection_uri


def log_datasets(run_id: str, examples_uri: str, selection_uri: str) -> None:
    """The pool and the selection in the MLflow run's Datasets column, by URI and content key."""
    ex, sel = examples_meta(examples_uri), selection_meta(selection_uri)
    tracking.log_dataset(run_id, "pool", examples_uri, content_key(examples_uri), "pool", rows=ex.n_train,
                         tokens=ex.train_tokens)
    tracking.log_dataset(run_id, "selection", selection_uri, content_key(selection_uri), "training",
                         rows=sel.selected, tokens=sel.selected_tokens)


def summary_markdown(summary: dict) -> str:
    rows = "\n".join(f"| {k} | {v} |" for k, v in summary.items() if k != "timings")
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in summary.get("timings", {}).items())
    return f"# Curation `{summary['name']}`\n\n| field | value |\n|---|---|\n{rows}\n\nStage timings: {timings}\n"


@flow(name="curate", flow_run_name=flow_run_name, log_prints=True, persist_result=False,
      task_runner=task_runner_from_settings())
def curate(config: CurateConfig = CurateConfig()) -> dict:
    """Select the most informative subset of a data set and commit it as a selection manifest."""
    cfg = config if isinstance(config, CurateConfig) else CurateConfig.model_validate(config)
    ensure_home()
    timings: dict[str, float] = {}
    tags = {"prefect.flow_run_id": str(flow_run.id or ""), "prefect.flow": "curate", "method": cfg.selection.method}
    with tracking.start_run(cfg.name, tags=tags, params=cfg.model_dump()) as run_id:
        link_runs(run_id)
        examples_uri, selection_uri = select_pipeline(cfg, run_id, timings)
        with progress.stage("records", timings):
            curated_uri = call(curated_task, examples_uri, selection_uri)
        meta = selection_meta(selection_uri)
        ex_meta = examples_meta(examples_uri)
        summary = {
            "name": cfg.name, "method": cfg.selection.method, "pool_size": meta.pool_size,
            "heldout_size": ex_meta.n_heldout, "duplicates_removed": ex_meta.duplicates_removed,
            "files_skipped": len(ex_meta.skipped_files),  # which and why: the examples' manifest
            "template": ex_meta.template, "too_long_cut": ex_meta.too_long_cut,
            "too_long_dropped": ex_meta.too_long_dropped, "gate_dropped": ex_meta.gate_dropped,
            "budget": cfg.selection.examples_budget, "token_budget": cfg.selection.token_budget,
            "binding_limit": binding_limit(selection_budget(cfg), meta.selected, meta.selected_tokens,
                                           meta.pool_size),
            "selected": meta.selected, "pool_tokens": meta.pool_tokens, "tokens_kept": meta.selected_tokens,
            "objective": meta.objective, "target_model": cfg.models.target,
            "target_fingerprint": model_fingerprint(cfg.models.target),
            "examples_uri": examples_uri, "selection_uri": selection_uri, "curated_uri": curated_uri,
            "mlflow_run_id": run_id,
            "flow_run_id": str(flow_run.id or ""), "timings": timings,
        }
        metrics = {"pool_size": meta.pool_size, "selected": meta.selected, "pool_tokens": meta.pool_tokens,
                   "tokens_kept": meta.selected_tokens, "duplicates_removed": ex_meta.duplicates_removed,
                   "kept_token_fraction": meta.selected_tokens / max(meta.pool_tokens, 1),
                   **{f"seconds_{k}": v for k, v in timings.items()}}
        if meta.objective is not None:
            metrics["objective"] = meta.objective
        tracking.log_metrics(run_id, metrics)
        # what `sftcurate ls` and `sftcurate export NAME|RUN_ID` read (core/locate.py)
        tracking.set_tags(run_id, {"sftcurate.selection_uri": selection_uri, "sftcurate.curated_uri": curated_uri,
                                   "sftcurate.selected": meta.selected,
                                   "sftcurate.tokens_kept": meta.selected_tokens})
        log_datasets(run_id, examples_uri, selection_uri)
        tracking.log_bytes(run_id, read_bytes(join(selection_uri, "selection.parquet")), "selection.parquet", "selection")
        tracking.log_bytes(run_id, read_bytes(join(selection_uri, "_MANIFEST.json")), "selection_manifest.json", "selection")
        tracking.log_bytes(run_id, json.dumps(summary, indent=2, default=str).encode(), "summary.json")
        report, png = curation_report(examples_uri, selection_uri, cfg.name)
        if ex_meta.gate_uri:
            report += "\n" + gate_markdown(ex_meta.gate_uri)
            tracking.log_bytes(run_id, read_bytes(join(ex_meta.gate_uri, "dropped.jsonl")), "gate_dropped.jsonl",
                               "report")
        tracking.log_bytes(run_id, report.encode(), "report.md", "report")
        tracking.log_bytes(run_id, png, "report.png", "report")
        create_markdown_artifact(summary_markdown(summary) + "\n" + report, key="curation-summary",
                                 description=f"sftcurate selection ({cfg.selection.method})")
    return summary


__all__ = ["curate", "select_pipeline", "BudgetError"]
