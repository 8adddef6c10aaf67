"""The `compare` flow: prove a selection helps. For each budget x method:

    select (the curate pieces)  ->  fine-tune the target  ->  held-out loss  ->  generations
    ->  pairwise judge against Uniform at the same budget

then one table shaped like the papers' (win rate vs Uniform per budget, plus held-out loss) as markdown, CSV,
an EVAL_RESULTS parquet and a PNG plot, a Prefect markdown artifact, and an MLflow parent run with one child
run per cell. Every stage is a cached task keyed on URIs and fingerprints, so adding a budget or a method
runs only what is new.
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Literal

import infra  # noqa: F401  (environment defaults first)
import pyarrow as pa
from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from pydantic import Field, model_validator

from data_contracts import EVAL_RESULTS
from flows.curate import select_pipeline
from infra import progress, tracking
from infra.hashing import fingerprint
from infra.models import model_fingerprint
from infra.runners import task_runner_from_settings
from infra.store import ArtifactStore, join, read_bytes, read_manifest
from sftcurate.config import CurateConfig, PoolConfig, SelectionConfig, load_config
from tasks.common import run_committed
from tasks.evaluate import GenerationConfig, generate_task, heldout_task, read_eval
from tasks.finetune import FinetuneConfig, fairness_params, finetune_meta, finetune_task
from tasks.judge import JudgeConfig, judge_note, judge_task

BASELINE = "uniform"
REPORT_KIND = "compare_report"


class CompareConfig(PoolConfig):
    name: str = Field("comparison", description="name of this comparison (MLflow parent run name)")
    methods: list[str] = Field(default_factory=lambda: ["uniform", "fishersft"],
                               description="selectors to compare; uniform (the baseline) is always added")
    method_params: dict[str, dict[str, Any]] = Field(default_factory=dict,
                                                     description="selector name -> selector parameters")
    budgets: list[int] = Field(default_factory=lambda: [64, 128], description="budgets to compare at")
    budget_unit: Literal["examples", "tokens"] = Field("examples", description="what a budget counts")
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig,
                                     description="one recipe for every cell (max_length defaults to models')")
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    seed: int = Field(0, description="seed of selection, prompt sampling and bootstrap")

    @model_validator(mode="after")
    def _check(self):
        if not self.budgets or any(b <= 0 for b in self.budgets):
            raise ValueError("budgets must be a non-empty list of positive numbers")
        if len(set(self.budgets)) != len(self.budgets):
            raise ValueError("budgets must not repeat")
        if not self.methods:
            raise ValueError("methods must name at least one selector")
        if "max_length" not in self.finetune.model_fields_set:
            self.finetune = self.finetune.model_copy(update={"max_length": self.models.max_length})
        return self

    @property
    def all_methods(self) -> list[str]:
        return [BASELINE] + [m for m in dict.fromkeys(self.methods) if m != BASELINE]

    def curate_config(self, method: str, budget: int) -> CurateConfig:
        examples, tokens = (budget, None) if self.budget_unit == "examples" else (None, budget)
        return CurateConfig(
            name=f"{self.name}:{method}@{budget}", **self.pool_sections(),
            selection=SelectionConfig(method=method, budget=examples, token_budget=tokens, seed=self.seed,
                                      params=self.method_params.get(method, {})))

    def generation_config(self) -> GenerationConfig:
        return GenerationConfig(max_prompts=self.judge.max_prompts, max_new_tokens=self.judge.max_new_tokens,
                                prompt_words=self.judge.prompt_words, max_length=self.models.max_length,
                                seed=self.seed)


def load_compare_config(path: str | Path | None = None, overrides: list[str] | None = None) -> CompareConfig:
    return load_config(path, overrides, model=CompareConfig)


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


def commit_report(cfg: CompareConfig, rows: list[dict], cells: dict, markdown: str, summary: dict) -> str:
    store = ArtifactStore()
    key = fingerprint(cfg.model_dump(), {f"{m}@{b}": c for (m, b), c in cells.items()}, rows)
    existing = store.committed(REPORT_KIND, key)
    if existing:
        return existing
    writer = store.begin(REPORT_KIND, key)
    writer.write_bytes("results.md", markdown.encode())
    writer.write_bytes("results.csv", csv_bytes(rows))
    writer.write_table("results.parquet", pa.Table.from_pylist([{k: r[k] for k in EVAL_RESULTS.schema.names}
                                                                for r in rows]), EVAL_RESULTS)
    writer.write_bytes("results.png", plot_png(cfg, rows))
    writer.write_json("summary.json", summary)
    writer.meta.update({"name": cfg.name, "methods": cfg.all_methods, "budgets": cfg.budgets})
    return writer.commit()


# ---------------------------------------------------------------- the flow

def _public_params(cfg: CompareConfig) -> dict:
    d = cfg.model_dump()
    d["judge"].pop("template", None)  # long; it is in the report artifact
    return d


@flow(name="compare", log_prints=True, task_runner=task_runner_from_settings())
def compare(config: CompareConfig = CompareConfig()) -> dict:
    """Fine-tune the target on each selection (methods x budgets) and compare held-out loss and judge win rate."""
    cfg = config if isinstance(config, CompareConfig) else CompareConfig.model_validate(config)
    target, target_fp = cfg.models.target, model_fingerprint(cfg.models.target)
    ft_json = cfg.finetune.model_dump_json()
    gen_json = cfg.generation_config().model_dump_json()
    judge_json = cfg.judge.model_dump_json()
    timings: dict[str, float] = {}
    cells: dict[tuple[str, int], dict] = {}
    examples_uri = None
    store_root = ArtifactStore().root  # part of every cache key: a cached URI must live in this store
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
                        model_uri = run_committed(finetune_task, examples_uri, selection_uri, target, target_fp,
                                                  ft_json, child, store_root)
                    with progress.stage(f"{cell_name} evaluate", timings):
                        eval_uri = run_committed(heldout_task, examples_uri, model_uri, target, target_fp,
                                                 cfg.models.max_length, child, store_root)
                        gens_uri = run_committed(generate_task, examples_uri, model_uri, target, target_fp, gen_json,
                                                 child, store_root)
                    cell = {"selection_uri": selection_uri, "model_uri": model_uri, "eval_uri": eval_uri,
                            "generations_uri": gens_uri, "heldout": read_eval(eval_uri),
                            "mlflow_run_id": child, "steps_done": finetune_meta(model_uri)["steps_done"]}
                    if method != BASELINE:
                        with progress.stage(f"{cell_name} judge", timings):
                            j_uri = run_committed(judge_task, gens_uri, cells[(BASELINE, budget)]["generations_uri"],
                                                  method, BASELINE, judge_json, cfg.seed, child, store_root)
                        cell["judgments_uri"] = j_uri
                        cell["judge"] = read_manifest(j_uri)["meta"]["summary"]
                    cells[(method, budget)] = cell
        with progress.stage("base model", timings):
            base_uri = run_committed(heldout_task, examples_uri, None, target, target_fp, cfg.models.max_length,
                                     parent, store_root)
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
            "rows": rows, "timings": timings,
        }
        report_uri = commit_report(cfg, rows, cells, markdown, {k: v for k, v in summary.items()
                                                                  if k not in ("timings", "flow_run_id",
                                                                               "mlflow_run_id")})
        summary["report_uri"] = report_uri
        summary["table_markdown"] = markdown
        for name in ("results.md", "results.csv", "results.parquet", "results.png"):
            tracking.log_bytes(parent, read_bytes(join(report_uri, name)), name, "report")
        tracking.log_metrics(parent, {"base_heldout_loss": base["loss"], "cells": len(cells)})
        create_markdown_artifact(markdown, key="compare-results", description=f"sftcurate comparison {cfg.name}")
    print(markdown)
    return json.loads(json.dumps(summary, default=str))


__all__ = ["CompareConfig", "compare", "load_compare_config"]
