"""The `compare` flow: prove a selection helps. For each budget x method:

    select (the curate pieces)  ->  fine-tune the target  ->  held-out loss  ->  generations
    ->  pairwise judge against Uniform at the same budget

then one table shaped like the papers' (win rate vs Uniform per budget, plus held-out loss) as markdown, CSV,
an EVAL_RESULTS parquet and a PNG plot, a Prefect markdown artifact, and an MLflow parent run with one child
run per cell. Every stage is an artifact keyed on its inputs and code (`infra.stages`), so adding a budget or a
method runs only what is new, and a rerun that reuses every stage reuses the report too.
"""
from __future__ import annotations

import csv
import io
import json
import math

import pyarrow as pa
import sftcurate.infra  # noqa: F401  (environment defaults before Prefect reads its settings)
from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from sftcurate.core.config import BASELINE, CompareConfig, load_compare_config
from sftcurate.core.evaluate import read_eval
from sftcurate.core.finetune import fairness_params, finetune_meta
from sftcurate.core.judge import judge_note
from sftcurate.data_contracts import EVAL_RESULTS
from sftcurate.flows.curate import select_pipeline
from sftcurate.infra import progress, tracking
from sftcurate.infra.env import ensure_home
from sftcurate.infra.runners import task_runner_from_settings
from sftcurate.infra.stages import build_once
from sftcurate.infra.store import join, read_bytes, read_manifest
from sftcurate.tasks.common import call
from sftcurate.tasks.evaluate import finetune_task, generate_task, heldout_task, judge_task

REPORT_KIND = "compare_report"


# ---------------------------------------------------------------- report

def _ratio(x, scale: float = 1.0, spec: str = ".2f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(scale * x, spec)


def _pct(x) -> str:
    return _ratio(x, 100.0, ".1f")


def result_rows(cfg: CompareConfig, cells: dict, base: dict) -> list[dict]:
    rows = [{"method": "base", "budget": 0, "heldout_loss": base["loss"], "heldout_ppl": base["ppl"],
             "win_rate_vs_uniform": None, "win_rate_ci_low": None, "win_rate_ci_high": None, "wins": None,
             "losses": None, "ties": None, "errors": None, "position_bias": None, "longer_won": None,
             "lc_win_rate": None}]
    for budget in cfg.budgets:
        for method in cfg.all_methods:
            c = cells[(method, budget)]
            j = c.get("judge") or {}
            rows.append({"method": method, "budget": budget, "heldout_loss": c["heldout"]["loss"],
                         "heldout_ppl": c["heldout"]["ppl"], "win_rate_vs_uniform": j.get("win_rate"),
                         "win_rate_ci_low": j.get("ci_low"), "win_rate_ci_high": j.get("ci_high"),
                         "wins": j.get("wins"), "losses": j.get("losses"), "ties": j.get("ties"),
                         "errors": j.get("errors"), "position_bias": j.get("position_bias"),
                         "longer_won": j.get("longer_won"), "lc_win_rate": j.get("lc_win_rate")})
    return rows


def markdown_table(cfg: CompareConfig, rows: list[dict], note: str | None) -> str:
    unit = "examples" if cfg.budget_unit == "examples" else "loss tokens"
    by = {(r["method"], r["budget"]): r for r in rows}
    head = "| Method | " + " | ".join(str(b) for b in cfg.budgets) + " |\n|---|" + "---|" * len(cfg.budgets)
    ft = cfg.finetune
    recipe = (f"{'full fine-tuning' if ft.full else f'LoRA r={ft.lora_r} alpha={ft.lora_alpha}'}, {ft.steps} steps, "
              f"batch {ft.batch_size}, lr {ft.learning_rate:g}, max length {ft.max_length}, seed {ft.seed}")
    lines = [f"# Comparison `{cfg.name}`", "",
             f"Target `{cfg.models.target}`, {recipe}: the same recipe for every cell. Budgets in {unit}.", "",
             f"## Win rate vs Uniform (%), 95% bootstrap CI over prompts (judge: {cfg.judge.backend} "
             f"`{cfg.judge.model or 'default'}`, both orders, disagreement = tie)", "", head]
    for m in cfg.all_methods[1:]:
        cells = []
        for b in cfg.budgets:
            r = by[(m, b)]
            cells.append(f"{_pct(r['win_rate_vs_uniform'])} [{_pct(r['win_rate_ci_low'])}, "
                         f"{_pct(r['win_rate_ci_high'])}]")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if len(cfg.all_methods) == 1:
        lines.append("| (only uniform) | " + " | ".join("-" for _ in cfg.budgets) + " |")
    base = by[("base", 0)]
    lines += ["", f"## Held-out loss (perplexity); base model without fine-tuning: {base['heldout_loss']:.4f} "
              f"({base['heldout_ppl']:.2f})", "", head]
    for m in cfg.all_methods:
        lines.append(f"| {m} | " + " | ".join(f"{by[(m, b)]['heldout_loss']:.4f} ({by[(m, b)]['heldout_ppl']:.2f})"
                                               for b in cfg.budgets) + " |")
    lines += ["", "## Judge diagnostics", "",
              "| Method | Budget | wins | losses | ties | judge errors | position bias (slot 1 picked) "
              "| length bias (longer text won) | length-controlled win rate (%) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for m in cfg.all_methods[1:]:
        for b in cfg.budgets:
            r = by[(m, b)]
            lines.append(f"| {m} | {b} | {r['wins']} | {r['losses']} | {r['ties']} | {r['errors']} | "
                         f"{_ratio(r['position_bias'])} | {_ratio(r.get('longer_won'))} | "
                         f"{_pct(r.get('lc_win_rate'))} |")
    if note:
        lines += ["", f"**Judge caveat:** {note}."]
    return "\n".join(lines) + "\n"


def csv_bytes(rows: list[dict]) -> bytes:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue().encode()


def plot_png(cfg: CompareConfig, rows: list[dict]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for m in cfg.all_methods:
        rs = [r for r in rows if r["method"] == m]
        x = [r["budget"] for r in rs]
        ax2.plot(x, [r["heldout_loss"] for r in rs], marker="o", label=m)
        if m != BASELINE:
            y = [100 * (r["win_rate_vs_uniform"] if r["win_rate_vs_uniform"] is not None else float("nan"))
                 for r in rs]
            lo = [yy - 100 * (r["win_rate_ci_low"] if r["win_rate_ci_low"] is not None else float("nan"))
                  for yy, r in zip(y, rs)]
            hi = [100 * (r["win_rate_ci_high"] if r["win_rate_ci_high"] is not None else float("nan")) - yy
                  for yy, r in zip(y, rs)]
            ax1.errorbar(x, y, yerr=[lo, hi], marker="o", capsize=3, label=m)
    base = next(r for r in rows if r["method"] == "base")
    ax2.axhline(base["heldout_loss"], color="grey", linestyle="--", label="base model")
    ax1.axhline(50, color="grey", linestyle="--", label="uniform (50%)")
    unit = "examples" if cfg.budget_unit == "examples" else "loss tokens"
    ax1.set(xlabel=f"budget ({unit})", ylabel="win rate vs uniform (%)", title="LLM judge")
    ax2.set(xlabel=f"budget ({unit})", ylabel="held-out loss", title="held-out loss")
    for ax in (ax1, ax2):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


ARTIFACT_KEYS = ("selection_uri", "model_uri", "eval_uri", "generations_uri", "judgments_uri")


def commit_report(cfg: CompareConfig, rows: list[dict], cells: dict, base_uri: str, markdown: str,
                  summary: dict) -> str:
    """The report artifact: keyed on the config and every cell's artifacts, so a rerun that reuses every stage
    reuses the report too (MLflow run ids and timings are not part of it)."""

    def build(writer) -> None:
        writer.write_bytes("results.md", markdown.encode())
        writer.write_bytes("results.csv", csv_bytes(rows))
        writer.write_table("results.parquet", pa.Table.from_pylist([{k: r[k] for k in EVAL_RESULTS.schema.names}
                                                                    for r in rows]), EVAL_RESULTS)
        writer.write_bytes("results.png", plot_png(cfg, rows))
        writer.write_json("summary.json", summary)
        writer.meta.update({"name": cfg.name, "methods": cfg.all_methods, "budgets": cfg.budgets})

    upstream = {"base": base_uri, **{f"{m}@{b}": {k: c[k] for k in ARTIFACT_KEYS if k in c}
                                     for (m, b), c in cells.items()}}
    return build_once(REPORT_KIND, __name__, {"config": cfg}, build, upstream=upstream)


# ---------------------------------------------------------------- the flow

def _public_params(cfg: CompareConfig) -> dict:
    d = cfg.model_dump()
    d["judge"].pop("template", None)  # long; it is in the report artifact
    return d


@flow(name="compare", log_prints=True, task_runner=task_runner_from_settings())
def compare(config: CompareConfig = CompareConfig()) -> dict:
    """Fine-tune the target on each selection (methods x budgets) and compare held-out loss and judge win rate."""
    cfg = config if isinstance(config, CompareConfig) else CompareConfig.model_validate(config)
    ensure_home()
    target = cfg.models.target
    timings: dict[str, float] = {}
    cells: dict[tuple[str, int], dict] = {}
    runs: dict[str, str] = {}
    examples_uri = None
    tags = {"prefect.flow_run_id": str(flow_run.id or ""), "prefect.flow": "compare"}
    with tracking.start_run(cfg.name, tags=tags, params=_public_params(cfg)) as parent:
        for budget in cfg.budgets:
            for method in cfg.all_methods:  # uniform first: its generations are what the others are judged against
                cell_name = f"{method}@{budget}"
                child_tags = {"method": method, "budget": budget, "budget_unit": cfg.budget_unit,
                              "prefect.flow": "compare"}
                child_params = {"method": method, "budget": budget, "budget_unit": cfg.budget_unit,
                                **fairness_params(cfg.finetune, target)}
                with tracking.start_run(cell_name, tags=child_tags, params=child_params,
                                        parent_run_id=parent) as child:
                    with progress.stage(f"{cell_name} select", timings):
                        examples_uri, selection_uri = select_pipeline(cfg.curate_config(method, budget), child)
                    with progress.stage(f"{cell_name} finetune", timings):
                        model_uri = call(finetune_task, examples_uri, selection_uri, target, cfg.finetune, child)
                    with progress.stage(f"{cell_name} evaluate", timings):
                        eval_uri = call(heldout_task, examples_uri, model_uri, target, cfg.models.max_length, child)
                        gens_uri = call(generate_task, examples_uri, model_uri, target, cfg.generation_config(),
                                        child)
                    runs[cell_name] = child
                    cell = {"selection_uri": selection_uri, "model_uri": model_uri, "eval_uri": eval_uri,
                            "generations_uri": gens_uri, "heldout": read_eval(eval_uri),
                            "steps_done": finetune_meta(model_uri)["steps_done"]}
                    if method != BASELINE:
                        with progress.stage(f"{cell_name} judge", timings):
                            j_uri = call(judge_task, gens_uri, cells[(BASELINE, budget)]["generations_uri"],
                                         method, BASELINE, cfg.judge, cfg.seed, child)
                        cell["judgments_uri"] = j_uri
                        cell["judge"] = read_manifest(j_uri)["meta"]["summary"]
                    cells[(method, budget)] = cell
        with progress.stage("base model", timings):
            base_uri = call(heldout_task, examples_uri, None, target, cfg.models.max_length, parent)
        base = read_eval(base_uri)
        note = judge_note(cfg.judge)
        rows = result_rows(cfg, cells, base)
        markdown = markdown_table(cfg, rows, note)
        summary = {
            "name": cfg.name, "mlflow_run_id": parent, "flow_run_id": str(flow_run.id or ""),
            "examples_uri": examples_uri, "methods": cfg.all_methods, "budgets": cfg.budgets,
            "budget_unit": cfg.budget_unit, "target_model": target, "base_heldout_loss": base["loss"],
            "base_eval_uri": base_uri, "judge_backend": cfg.judge.backend, "judge_note": note,
            "cells": {f"{m}@{b}": {k: v for k, v in c.items()} for (m, b), c in cells.items()},
            "rows": rows, "timings": timings, "mlflow_runs": runs,
        }
        report_uri = commit_report(cfg, rows, cells, base_uri, markdown,
                                   {k: v for k, v in summary.items()
                                    if k not in ("timings", "flow_run_id", "mlflow_run_id", "mlflow_runs")})
        summary["report_uri"] = report_uri
        summary["table_markdown"] = markdown
        for name in ("results.md", "results.csv", "results.parquet", "results.png"):
            tracking.log_bytes(parent, read_bytes(join(report_uri, name)), name, "report")
        tracking.log_metrics(parent, {"base_heldout_loss": base["loss"], "cells": len(cells)})
        create_markdown_artifact(markdown, key="compare-results", description=f"sftcurate comparison {cfg.name}")
    print(markdown)
    return json.loads(json.dumps(summary, default=str))


__all__ = ["CompareConfig", "compare", "load_compare_config"]  # the config lives in core.config
