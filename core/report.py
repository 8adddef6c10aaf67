"""The comparison report: every number comes from committed artifacts (held-out losses per example, selections,
judgments), turned into rows, a markdown table, CSV, an EVAL_RESULTS parquet and a PNG.

A cell is one method at one budget over R replicates. Its held-out loss is reported with a 95% interval over
held-out examples and replicates, its difference to uniform with a paired interval, and a verdict only where
that interval excludes 0 (`core.evidence`). Next to the mean: the worst group's loss and how the selection
covers the pool's groups (where FisherSFT's claim, lower maximum error, and S2L's, rare groups covered, are
tested), and the loss tokens every cell trained on (equal within one batch by construction).
"""
from __future__ import annotations

import csv
import io
import math

import numpy as np
import pyarrow as pa

from sftcurate.core import evidence
from sftcurate.core.config import BASELINE, CompareConfig
from sftcurate.core.answers import answer_check
from sftcurate.core.evaluate import load_generations, read_eval, replicate_losses
from sftcurate.core.finetune import finetune_meta
from sftcurate.core.ingest import load_pool
from sftcurate.core.selection import load_selection
from sftcurate.data_contracts import EVAL_RESULTS
from sftcurate.data_contracts.manifests import CompareReportMeta, JudgeSanityMeta
from sftcurate.infra.stages import build_once

KIND = "compare_report"
FULL = "full"              # the whole pool trained with the same token compute (a reference row)
ARTIFACT_KEYS = ("selection_uri", "model_uri", "eval_uri", "generations_uri", "judgments_uri")


def _fmt(x, spec: str = ".4f", scale: float = 1.0, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return format(scale * x, ("+" if signed else "") + spec)


def _pct(x) -> str:
    return _fmt(x, ".1f", 100.0)


def _losses(replicates: list[dict]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """loss[r, i], tokens[i] and groups[i] of the held-out examples, from each replicate's eval artifact."""
    _, loss, tokens, groups = replicate_losses([r["eval_uri"] for r in replicates])
    return loss, tokens, groups


def result_rows(cfg: CompareConfig, cells: dict, base_uri: str, examples_uri: str, methods: list[str],
                n_boot: int = 2000) -> list[dict]:
    """One row for the base model, one per (method, budget); `cells[(method, budget)]` lists the replicates."""
    base_loss, tokens, groups = _losses([{"eval_uri": base_uri}])
    base_ci = evidence.bootstrap(base_loss, tokens, n_boot, cfg.seed)
    base_groups = evidence.group_losses(base_loss, tokens, groups)
    pool_groups = load_pool(examples_uri).column("group").to_pylist()
    check = answer_check(cfg.judge.check)
    rows = [{**_row("base", 0, base_ci, None, base_groups, None, {}, 0, 0, 1),
             **worst_group_columns(None, None, 1, tested=False),
             **balanced_columns(evidence.balanced_bootstrap(base_loss, tokens, groups, None, n_boot, cfg.seed),
                                None, 1),
             **answer_columns(None, None, n_boot, cfg.seed)}]
    for budget in cfg.budgets:
        baseline, _, _ = _losses(cells[(BASELINE, budget)])
        baseline_hits = answer_hits(cells[(BASELINE, budget)], check)
        # the group to test is fixed from uniform alone, among groups big enough to test: the smallest groups
        # are often the worst, and an interval over one or two of their texts would show only seed noise
        baseline_worst, _ = evidence.worst_group(evidence.group_losses(baseline, tokens, groups),
                                                 among=evidence.testable_groups(groups))
        for method in methods:
            reps = cells[(method, budget)]
            loss, _, _ = _losses(reps)
            ci = evidence.bootstrap(loss, tokens, n_boot, cfg.seed)
            diff = None if method == BASELINE else evidence.paired_difference(loss, baseline, tokens, n_boot, cfg.seed)
            worst_diff = None if method == BASELINE else evidence.group_difference(
                loss, baseline, tokens, groups, baseline_worst, n_boot, cfg.seed)
            picks = load_selection(reps[0]["selection_uri"])[0].column("index").to_pylist()
            cover = evidence.coverage([pool_groups[i] for i in picks], pool_groups)
            metas = [finetune_meta(r["model_uri"]) for r in reps]
            row = _row(method, budget, ci, diff, evidence.group_losses(loss, tokens, groups), cover,
                       reps[0].get("judge") or {}, float(np.mean([m.tokens_seen for m in metas])),
                       float(np.mean([m.steps_done for m in metas])), len(reps))
            row.update(worst_group_columns(baseline_worst, worst_diff, len(reps), tested=method != BASELINE))
            row.update(balanced_columns(
                evidence.balanced_bootstrap(loss, tokens, groups, None, n_boot, cfg.seed),
                None if method == BASELINE else evidence.balanced_bootstrap(loss, tokens, groups, baseline, n_boot,
                                                                            cfg.seed), len(reps)))
            hits = baseline_hits if method == BASELINE else answer_hits(reps, check)
            row.update(answer_columns(hits, None if method == BASELINE else baseline_hits, n_boot, cfg.seed))
            rows.append(row)
    return rows


def balanced_columns(ci, diff, replicates: int) -> dict:
    """The balanced-target loss (every held-out group weighs the same) and its paired difference to uniform."""
    return {"balanced_loss": ci.mean, "balanced_ci_low": ci.low, "balanced_ci_high": ci.high,
            "balanced_delta": diff.mean if diff else None, "balanced_delta_ci_low": diff.low if diff else None,
            "balanced_delta_ci_high": diff.high if diff else None,
            "balanced_verdict": evidence.verdict(diff, replicates) if diff else None}


def answer_hits(replicates: list[dict], check) -> np.ndarray | None:
    """hits[r, i]: did the generation for held-out prompt i pass the check, for every replicate that generated
    (replicate 0 of each cell); prompts in the order of uniform's, which every model shares (one seeded sample)."""
    tables = [load_generations(r["generations_uri"]) for r in replicates if r.get("generations_uri")]
    if not tables:
        return None
    return np.array([[bool(check(t, ref)) for t, ref in zip(tb.column("text").to_pylist(),
                                                             tb.column("reference").to_pylist())] for tb in tables],
                    dtype=np.float64)


def answer_columns(hits: np.ndarray | None, baseline: np.ndarray | None, n_boot: int, seed: int) -> dict:
    """The share of checked answers (the generation metric) and its paired difference to uniform's."""
    if hits is None:
        return {k: None for k in ("answer_match", "answer_ci_low", "answer_ci_high", "answer_delta",
                                  "answer_delta_ci_low", "answer_delta_ci_high", "answer_verdict")}
    ci = evidence.rate_interval(hits, None, n_boot, seed)
    diff = evidence.rate_interval(hits, baseline, n_boot, seed) if baseline is not None else None
    return {"answer_match": ci.mean, "answer_ci_low": ci.low, "answer_ci_high": ci.high,
            "answer_delta": diff.mean if diff else None, "answer_delta_ci_low": diff.low if diff else None,
            "answer_delta_ci_high": diff.high if diff else None,
            "answer_verdict": evidence.improvement_verdict(diff, len(hits)) if diff else None}


def worst_group_columns(group: str | None, diff, replicates: int, tested: bool = True) -> dict:
    """The difference to uniform on uniform's worst testable group: FisherSFT's claim is a lower maximum error."""
    return {"uniform_worst_group": group, "worst_group_delta": diff.mean if diff else None,
            "worst_group_delta_ci_low": diff.low if diff else None,
            "worst_group_delta_ci_high": diff.high if diff else None,
            "worst_group_verdict": (evidence.verdict(diff, replicates) if diff else
                                    None if not tested else
                                    f"no group has {evidence.MIN_GROUP_EXAMPLES} held-out examples")}


def _row(method, budget, ci, diff, per_group, cover, judge, tokens_seen, steps, replicates) -> dict:
    worst, worst_loss = evidence.worst_group(per_group)
    return {
        "method": method, "budget": budget, "heldout_loss": ci.mean, "heldout_ppl": math.exp(min(ci.mean, 50.0)),
        "loss_ci_low": ci.low, "loss_ci_high": ci.high,
        "delta_vs_uniform": diff.mean if diff else None, "delta_ci_low": diff.low if diff else None,
        "delta_ci_high": diff.high if diff else None,
        "verdict": evidence.verdict(diff, replicates) if diff else None,
        "worst_group": worst, "worst_group_loss": worst_loss,
        "groups_covered": cover["groups_covered"] if cover else None, "groups": cover["groups"] if cover else None,
        "share_distance": cover["share_distance"] if cover else None,
        "trained_tokens": tokens_seen, "steps": steps, "replicates": replicates,
        "win_rate_vs_uniform": judge.get("win_rate"), "win_rate_ci_low": judge.get("ci_low"),
        "win_rate_ci_high": judge.get("ci_high"), "wins": judge.get("wins"), "losses": judge.get("losses"),
        "ties": judge.get("ties"), "errors": judge.get("errors"), "position_bias": judge.get("position_bias"),
        "longer_won": judge.get("longer_won"), "lc_win_rate": judge.get("lc_win_rate"),
    }


def markdown_table(cfg: CompareConfig, rows: list[dict], methods: list[str], train_tokens: dict[int, int],
                   note: str | None, sanity: JudgeSanityMeta) -> str:
    by = {(r["method"], r["budget"]): r for r in rows}
    head = "| Method | " + " | ".join(str(b) for b in cfg.budgets) + " |\n|---|" + "---|" * len(cfg.budgets)
    lines = _loss_sections(cfg, by, methods, train_tokens, head)
    lines += _group_section(cfg, by, methods)
    lines += _judge_sections(cfg, by, methods, sanity, head)
    if note:
        lines += ["", f"**Judge caveat:** {note}."]
    return "\n".join(lines) + "\n"


def _loss_sections(cfg: CompareConfig, by: dict, methods: list[str], train_tokens: dict[int, int],
                   head: str) -> list[str]:
    """The recipe, held-out loss per cell, the difference to uniform and on its worst testable group."""
    unit = "examples" if cfg.budget_unit == "examples" else "loss tokens"
    ft = cfg.finetune
    recipe = (f"{'full fine-tuning' if ft.full else f'LoRA r={ft.lora_r} alpha={ft.lora_alpha}'}, batch "
              f"{ft.batch_size}, lr {ft.learning_rate:g}, max length {ft.max_length}")
    compute = ", ".join(f"{train_tokens[b]:,} at {b}" for b in cfg.budgets)
    base = by[("base", 0)]
    lines = [f"# Comparison `{cfg.name}`", "",
             f"Target `{cfg.models.target}`, {recipe}: one recipe for every cell. Budgets in {unit}. Every cell of "
             f"a budget trains on the same loss tokens ({cfg.epochs:g} x the budget: {compute}). "
             f"{cfg.replicates} replicate(s) per cell (selection and fine-tuning seeds {cfg.seed}.."
             f"{cfg.seed + cfg.replicates - 1}); intervals are 95% over held-out examples and replicates.", "",
             f"## Held-out loss, mean [95% interval]; base model without fine-tuning: {_fmt(base['heldout_loss'])} "
             f"[{_fmt(base['loss_ci_low'])}, {_fmt(base['loss_ci_high'])}]", "", head]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(f"{_fmt(by[(m, b)]['heldout_loss'])} [{_fmt(by[(m, b)]['loss_ci_low'])}, "
                                               f"{_fmt(by[(m, b)]['loss_ci_high'])}]" for b in cfg.budgets) + " |")
    lines += ["", "## Difference to uniform (held-out loss, negative = better), 95% paired interval, verdict "
              "(called only when the interval excludes 0)", "", head]
    for m in methods[1:]:
        lines.append(f"| {m} | " + " | ".join(
            f"{_fmt(by[(m, b)]['delta_vs_uniform'], signed=True)} [{_fmt(by[(m, b)]['delta_ci_low'], signed=True)}, "
            f"{_fmt(by[(m, b)]['delta_ci_high'], signed=True)}] **{by[(m, b)]['verdict']}**" for b in cfg.budgets) + " |")
    lines += ["", f"## Difference to uniform on uniform's worst group of those with at least "
              f"{evidence.MIN_GROUP_EXAMPLES} held-out examples (negative = better), 95% paired interval", "", head]
    for m in methods[1:]:
        lines.append(f"| {m} | " + " | ".join(
            f"{by[(m, b)]['uniform_worst_group']}: {_fmt(by[(m, b)]['worst_group_delta'], signed=True)} "
            f"[{_fmt(by[(m, b)]['worst_group_delta_ci_low'], signed=True)}, "
            f"{_fmt(by[(m, b)]['worst_group_delta_ci_high'], signed=True)}] **{by[(m, b)]['worst_group_verdict']}**"
            for b in cfg.budgets) + " |")
    return lines + _balanced_and_answer_lines(cfg, by, methods, head)


def _balanced_and_answer_lines(cfg: CompareConfig, by: dict, methods: list[str], head: str) -> list[str]:
    """The balanced-target loss and the generation metric, each with its difference to uniform."""
    base = by[("base", 0)]
    lines = ["", "## Balanced-target loss (the mean of the held-out groups' losses: every group weighs the same), "
             f"mean [95% interval], difference to uniform and verdict; base model {_fmt(base['balanced_loss'])}",
             "", head]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(_balanced_cell(by[(m, b)]) for b in cfg.budgets) + " |")
    lines += ["", f"## Generation metric: share of held-out prompts answered right (check `{cfg.judge.check}`, "
              "greedy, replicate 0), % [95% interval over prompts], difference to uniform (positive = better)",
              "", head]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(_answer_cell(by[(m, b)]) for b in cfg.budgets) + " |")
    return lines


def _balanced_cell(r: dict) -> str:
    text = f"{_fmt(r['balanced_loss'])} [{_fmt(r['balanced_ci_low'])}, {_fmt(r['balanced_ci_high'])}]"
    if r.get("balanced_delta") is not None:
        text += (f"; {_fmt(r['balanced_delta'], signed=True)} [{_fmt(r['balanced_delta_ci_low'], signed=True)}, "
                 f"{_fmt(r['balanced_delta_ci_high'], signed=True)}] **{r['balanced_verdict']}**")
    return text


def _answer_cell(r: dict) -> str:
    if r.get("answer_match") is None:
        return "n/a"
    text = f"{_pct(r['answer_match'])} [{_pct(r['answer_ci_low'])}, {_pct(r['answer_ci_high'])}]"
    if r.get("answer_delta") is not None:
        text += (f"; {_fmt(r['answer_delta'], '.1f', 100.0, True)} [{_fmt(r['answer_delta_ci_low'], '.1f', 100.0, True)}"
                 f", {_fmt(r['answer_delta_ci_high'], '.1f', 100.0, True)}] **{r['answer_verdict']}**")
    return text


def _group_section(cfg: CompareConfig, by: dict, methods: list[str]) -> list[str]:
    """Each cell's worst group and its coverage of the pool's groups."""
    base = by[("base", 0)]
    lines = ["", "## Groups: the worst group's held-out loss, and the selection's coverage of the pool's groups", "",
              "| Method | Budget | worst group | its loss | groups with a pick | share distance to the pool "
              "(0 = the pool's mix) | loss tokens trained | steps |", "|---|---|---|---|---|---|---|---|"]
    lines.append(f"| base | - | {base['worst_group']} | {_fmt(base['worst_group_loss'])} | - | - | 0 | 0 |")
    for b in cfg.budgets:
        for m in methods:
            r = by[(m, b)]
            lines.append(f"| {m} | {b} | {r['worst_group']} | {_fmt(r['worst_group_loss'])} | "
                         f"{r['groups_covered']}/{r['groups']} | {_fmt(r['share_distance'], '.3f')} | "
                         f"{r['trained_tokens']:,.0f} | {r['steps']:g} |")
    return lines


def _judge_sections(cfg: CompareConfig, by: dict, methods: list[str], sanity: JudgeSanityMeta,
                    head: str) -> list[str]:
    """The judge's sanity check, win rates against uniform and their tallies and biases."""
    judged = [m for m in methods[1:] if m != FULL]
    trusted = sanity.trusted
    lines = ["", f"**Judge sanity check:** on {sanity.pairs} pairs whose better side is known (a held-out "
              f"reference against another prompt's reference, a truncated or a shuffled text, both orders) the judge "
              f"picked the reference in {_pct(sanity.accuracy)}% (needs {_pct(sanity.threshold)}%), "
              f"position bias {_fmt(sanity.position_bias, '.2f')}: "
              + ("its win rates below can be read as evidence." if trusted else
                 "**the win rates below are NOT evidence**; read the held-out metrics above."),
              "", f"## Win rate vs Uniform (%){'' if trusted else ' (NOT EVIDENCE: the judge failed its sanity check)'}"
              f", replicate 0, 95% bootstrap CI over prompts (judge: {cfg.judge.backend} "
              f"`{cfg.judge.model or 'default'}`, both orders, disagreement = tie)", "", head]
    for m in judged:
        lines.append(f"| {m} | " + " | ".join(
            f"{_pct(by[(m, b)]['win_rate_vs_uniform'])} [{_pct(by[(m, b)]['win_rate_ci_low'])}, "
            f"{_pct(by[(m, b)]['win_rate_ci_high'])}]" for b in cfg.budgets) + " |")
    if not judged:
        lines.append("| (only uniform) | " + " | ".join("-" for _ in cfg.budgets) + " |")
    lines += ["", "| Method | Budget | wins | losses | ties | judge errors | position bias (slot 1 picked) "
              "| length bias (longer text won) | length-controlled win rate (%) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for m in judged:
        for b in cfg.budgets:
            r = by[(m, b)]
            lines.append(f"| {m} | {b} | {r['wins']} | {r['losses']} | {r['ties']} | {r['errors']} | "
                         f"{_fmt(r['position_bias'], '.2f')} | {_fmt(r['longer_won'], '.2f')} | "
                         f"{_pct(r['lc_win_rate'])} |")
    return lines


def csv_bytes(rows: list[dict]) -> bytes:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue().encode()


def plot_png(cfg: CompareConfig, rows: list[dict], methods: list[str]) -> bytes:
    fig = plot_figure(cfg, rows, methods)  # selects the Agg backend before pyplot is imported here
    import matplotlib.pyplot as plt  # deferred on purpose: matplotlib (see plot_figure)

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def plot_figure(cfg: CompareConfig, rows: list[dict], methods: list[str]):
    """Held-out loss and the difference to uniform by budget. A method keeps its colour in both panels, and the
    methods are spread a little along x so intervals at one budget do not hide each other."""
    import matplotlib  # deferred on purpose: matplotlib (seconds), for the report's figure only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    budgets = sorted(set(cfg.budgets))
    gap = min((b - a for a, b in zip(budgets, budgets[1:])), default=max(budgets[0], 1))
    for i, m in enumerate(methods):
        style = {"marker": "o", "capsize": 3, "label": m, "color": f"C{i}"}
        shift = (i - (len(methods) - 1) / 2) * 0.03 * gap
        rs = [r for r in rows if r["method"] == m]
        x = [r["budget"] + shift for r in rs]
        y = [r["heldout_loss"] for r in rs]
        ax1.errorbar(x, y, yerr=[[a - r["loss_ci_low"] for a, r in zip(y, rs)],
                                 [r["loss_ci_high"] - a for a, r in zip(y, rs)]], **style)
        if m != BASELINE:
            d = [r["delta_vs_uniform"] for r in rs]
            ax2.errorbar(x, d, yerr=[[a - r["delta_ci_low"] for a, r in zip(d, rs)],
                                     [r["delta_ci_high"] - a for a, r in zip(d, rs)]], **style)
    base = next(r for r in rows if r["method"] == "base")
    ax1.axhline(base["heldout_loss"], color="grey", linestyle="--", label="base model")
    ax2.axhline(0, color="grey", linestyle="--", label="uniform")
    unit = "examples" if cfg.budget_unit == "examples" else "loss tokens"
    ax1.set(xlabel=f"budget ({unit})", ylabel="held-out loss", title="held-out loss, 95% interval")
    ax2.set(xlabel=f"budget ({unit})", ylabel="loss - uniform's", title="difference to uniform, 95% paired interval")
    for ax in (ax1, ax2):
        ax.set_xticks(budgets)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def commit_report(cfg: CompareConfig, rows: list[dict], cells: dict, base_uri: str, sanity_uri: str,
                  markdown: str, summary: dict, methods: list[str]) -> str:
    """The report artifact: keyed on the config and every cell's artifacts, so a rerun that reuses every stage
    reuses the report too (MLflow run ids and timings are not part of it)."""

    def build(writer) -> None:
        writer.write_bytes("results.md", markdown.encode())
        writer.write_bytes("results.csv", csv_bytes(rows))
        writer.write_table("results.parquet", pa.Table.from_pylist([{k: r[k] for k in EVAL_RESULTS.schema.names}
                                                                    for r in rows]), EVAL_RESULTS)
        writer.write_bytes("results.png", plot_png(cfg, rows, methods))
        writer.write_json("summary.json", summary)
        writer.meta.update({"name": cfg.name, "methods": methods, "budgets": cfg.budgets})

    upstream = {"base": base_uri, "judge_sanity": sanity_uri, **{f"{m}@{b}#{i}": {k: rep[k] for k in ARTIFACT_KEYS if k in rep}
                                     for (m, b), reps in cells.items() for i, rep in enumerate(reps)}}
    return build_once(KIND, __name__, {"config": cfg}, build, upstream=upstream, meta=CompareReportMeta)


__all__ = ["result_rows", "markdown_table", "csv_bytes", "plot_png", "commit_report", "read_eval", "FULL"]
