"""Evidence where selection should pay (issue 23): skewed, noisy and targeted pools, each built by a rule in
benchmarks/regimes.py and registered in docs/EVIDENCE.md ("Regimes: protocol") before its first run.

- `iso-skewed`: iso-qa (pycountry's ISO tables as short-answer questions), a 6,000-record training pool with the
  corpus's own skew (languages and subdivisions are 93% of it), 25 held-out records per group; budgets of 150
  and 300 examples (2.5% and 5% of the pool). Headline: the balanced-target loss; the generation metric (a
  normalised match of the short answer) next to it.
- `faq-noisy`: python-faq with 30% of its training records damaged (swapped, cut, refusal, spam), the held-out
  split clean; budgets of 3,000 and 6,000 loss tokens. Headline: held-out loss; what share of each damage kind
  every method picked.
- `iso-targeted`: iso-qa with a 50-record target file from two small groups (currency, script), the held-out set
  those groups, the pool everything else; budgets of 150 and 300 examples. Headline: held-out loss (the target's
  groups); targeted selectors where they exist, and uniform over the target's groups as a reference row.
- `iso-targeted-oracle` (the reference row the issue asks for, registered 2026-12-05): uniform over the pool's
  records of the target's groups, at the loss tokens `iso-targeted`'s uniform used at 150 examples (equal tokens),
  against `iso-targeted`'s uniform and each of its methods, paired per held-out example and replicate.
- `faq-noisy-gated` (issue 24's gate, registered 2026-12-05): the `faq-noisy` pool with `selection.gate`
  (target_loss, drop 0.3) in front of every method, 3,000 loss tokens. Readings: the damaged share of what the
  gate dropped; gated uniform against the ungated uniform of `faq-noisy` (same held-out examples and seeds,
  paired); each gated method against gated uniform.

Every regime runs the `compare` flow (SmolLM2-135M-Instruct with LoRA, 3 replicates, selectors at their shipped
defaults) and writes its table into docs/EVIDENCE.md between its own markers, whatever it shows.

    python benchmarks/bench_regimes.py --regimes iso-skewed     # one regime (about 40 minutes on 2 cores)
    python benchmarks/bench_regimes.py --regimes faq-noisy-gated  # the gate row (after faq-noisy: it reads its summary)
    python benchmarks/bench_regimes.py --write-only             # the tables again from the saved summaries
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import regimes  # noqa: E402
from bench_evidence import REPO, doc_sources, faq_records, replace_generated  # noqa: E402

START, END = "<!-- regimes:start -->", "<!-- regimes:end -->"
CPU = {"iso-skewed": {"budgets": [150, 300], "unit": "examples"},
       "faq-noisy": {"budgets": [3000, 6000], "unit": "tokens"},
       "iso-targeted": {"budgets": [150, 300], "unit": "examples"},
       "faq-noisy-gated": {"budgets": [3000], "unit": "tokens"},
       "iso-targeted-oracle": {"budgets": [150], "unit": "tokens"}}   # iso-targeted's, as loss tokens
TARGET_GROUPS = ["currency", "script"]
AFTER = {"faq-noisy-gated": "faq-noisy", "iso-targeted-oracle": "iso-targeted"}   # the run a row is read against
EPOCHS = 3             # registered: every cell trains on 3 x its budget's loss tokens
GATE = {"score": "target_loss", "drop": 0.3}   # registered: the shipped score, the pool's known damaged share
GPU_SCALE = 4          # on a GPU: budgets x 4 and a pool of 24,000 records where the corpus has them


def build(name: str, work: Path, gpu: bool, smoke: bool = False) -> tuple[list[dict], list[dict]]:
    """(pool records, target records) of a regime, by its registered rule (`smoke`: a few records of each)."""
    held = 3 if smoke else 25
    if name == "iso-skewed":
        pool_size = 120 if smoke else 6000 * (GPU_SCALE if gpu else 1)
        return regimes.skewed(regimes.iso_qa_records(), pool_size=pool_size, heldout_per_group=held, seed=0), []
    if name in ("faq-noisy", "faq-noisy-gated"):
        records = faq_records(doc_sources(work))
        return regimes.noisy(records[::4] if smoke else records, share=0.3, heldout_fraction=0.15, seed=0), []
    if name in ("iso-targeted", "iso-targeted-oracle"):
        records = regimes.iso_qa_records()
        if smoke:   # a few records of every group, enough of the target's groups to leave some in the pool
            records = [r for i, r in enumerate(records) if i % (8 if r["group"] in TARGET_GROUPS else 40) == 0]
        pool, target = regimes.targeted(records, TARGET_GROUPS,
                                        n_target=6 if smoke else 50, heldout_per_group=held, seed=0)
        if name.endswith("oracle"):   # the same held-out set; the training pool cut to the target's groups
            return [r for r in pool if r["split"] == "heldout" or r["group"] in TARGET_GROUPS], []
        return pool, target
    raise ValueError(name)


def compare_config(name: str, data: Path, target: Path | None, budgets: list[int], unit: str, methods: list[str],
                   smoke: bool = False):
    from sftcurate.core.config import CompareConfig

    short = name.startswith("iso")
    if smoke and not name.endswith("oracle"):   # tiny sizes: a tiny model, one budget, 2 replicates, few prompts
        budgets = [20] if unit == "examples" else [400]
    cfg = CompareConfig.model_validate({
        "name": f"regime-{name}",
        "source": {"uri": str(data), "group_field": "group", "split_field": "split"},
        "models": {"target": "builtin:smollm2-135m-instruct", "proxy": "tiny-gpt2", "max_length": 256},
        "proxy": {"steps": 200, "checkpoints": 8, "batch_size": 16},
        "methods": methods, "params": {"s2l": {"clusters": 16}}, "target": str(target) if target else None,
        "budget_unit": unit, "budgets": budgets, "epochs": EPOCHS, "replicates": 3,
        "reference_full": name not in AFTER, "gate": GATE if name.endswith("gated") else None,
        "finetune": {"batch_size": 8, "learning_rate": 1e-3, "checkpoint_every": 50},
        "judge": {"backend": "hf", "model": "builtin:smollm2-135m-instruct", "max_prompts": 48 if short else 12,
                  "max_new_tokens": 8 if short else 48, "check": "normalized",
                  "domain": "ISO code questions" if short else "Python documentation"},
        "seed": 0,
    })
    if smoke:
        cfg = CompareConfig.model_validate({**cfg.model_dump(), "models": {"target": "tiny-gpt2", "proxy": "tiny-gpt2",
                                                                            "max_length": 64},
                                            "replicates": 2, "reference_full": False,
                                            "proxy": {"steps": 10, "checkpoints": 2, "batch_size": 8},
                                            "judge": {**cfg.judge.model_dump(), "model": "tiny-gpt2",
                                                      "max_prompts": 4, "max_new_tokens": 4}})
    return cfg


def methods_for(name: str) -> list[str]:
    from sftcurate.core.selectors import REGISTRY

    if name.endswith("oracle"):
        return ["uniform"]
    wanted = ["fishersft", "s2l"] + (["similarity", "fishersft_target"] if name.endswith("targeted") else [])
    return [m for m in wanted if m in REGISTRY]


def picks_table(summary: dict, pool: list[dict]) -> list[str]:
    """What each method picked (means over replicates): group shares, and the share of each damage kind."""
    import pyarrow.parquet as pq

    from sftcurate.infra.store import join

    kinds = sorted({r["damage"] for r in pool if r["split"] == "train"})
    groups = sorted({r["group"] for r in pool})
    out: dict = {}
    for cell_name, cell in summary["cells"].items():
        method, budget = cell_name.split("@")[0], int(cell_name.split("@")[1].split("#")[0])
        sel = pq.read_table(join(cell["selection_uri"], "selection.parquet")).to_pylist()
        examples = pq.read_table(join(cell["examples_uri"], "examples.parquet"), columns=["id", "origin"]).to_pylist()
        # "file: line N" names the pool record an example came from (its text may have been cut to fit)
        line = {e["id"]: int(e["origin"].rsplit("line ", 1)[1]) for e in examples}
        picked = [pool[line[s["id"]] - 1] for s in sel]
        n = max(len(picked), 1)
        out.setdefault((budget, method), []).append(
            [len(picked)] + [sum(p["group"] == g for p in picked) / n for g in groups]
            + [sum(p["damage"] == k for p in picked) / n for k in kinds])
    train = [r for r in pool if r["split"] == "train"]
    pool_row = [len(train)] + [sum(r["group"] == g for r in train) / len(train) for g in groups] + \
        [sum(r["damage"] == k for r in train) / len(train) for k in kinds]
    head = ["budget", "method", "examples"] + [f"`{g}`" for g in groups] + [f"{k}" for k in kinds]
    lines = ["", "What each method picked (means over replicates; shares of its picks; the pool's own shares first):",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head),
             "| - | (pool) | " + " | ".join(f"{v:.2f}" if i else f"{v:,}" for i, v in enumerate(pool_row)) + " |"]
    for (budget, method), reps in sorted(out.items()):
        mean = [sum(x[i] for x in reps) / len(reps) for i in range(len(reps[0]))]
        lines.append(f"| {budget} | {method} | " + " | ".join(f"{v:.2f}" if i else f"{v:.1f}"
                                                           for i, v in enumerate(mean)) + " |")
    return lines


def _interval(r: dict, key: str, prefix: str, verdict: str, pct: bool = False) -> str:
    """"+0.0123 [-0.0050, +0.0300] no difference" from a row's difference, its interval and its verdict."""
    if r.get(key) is None:
        return "-"
    f = (lambda v: f"{100 * v:+.1f}") if pct else (lambda v: f"{v:+.4f}")
    return f"{f(r[key])} [{f(r[prefix + '_ci_low'])}, {f(r[prefix + '_ci_high'])}] {r[verdict]}"


def regime_row(r: dict) -> str:
    """One table row: token-weighted, balanced-target and worst-group loss, answers right; each against uniform."""
    answer = "-" if r.get("answer_match") is None else f"{100 * r['answer_match']:.1f}"
    worst = "-" if r.get("worst_group_delta") is None else (
        f"`{r['uniform_worst_group']}` "
        + _interval(r, "worst_group_delta", "worst_group_delta", "worst_group_verdict"))
    return " | ".join([
        f"| {r['budget']}", r["method"], f"{r['heldout_loss']:.4f}",
        _interval(r, "delta_vs_uniform", "delta", "verdict"),
        f"{r['balanced_loss']:.4f}", _interval(r, "balanced_delta", "balanced_delta", "balanced_verdict"),
        f"`{r['worst_group']}` {r['worst_group_loss']:.4f}", worst, answer,
        _interval(r, "answer_delta", "answer_delta", "answer_verdict", pct=True)]) + " |"


def group_losses_table(summary: dict) -> list[str]:
    """Each held-out group's loss per method and budget (its loss tokens pooled over replicates): where a method
    gains or loses, which the balanced and worst-group columns only summarise."""
    import pyarrow.parquet as pq

    from sftcurate.infra.store import join

    sums: dict = {}
    for cell_name, cell in summary["cells"].items():
        for r in pq.read_table(join(cell["eval_uri"], "losses.parquet")).to_pylist():
            acc = sums.setdefault(cell_name.split("#")[0], {}).setdefault(r["group"], [0.0, 0])
            acc[0] += r["loss_sum"]
            acc[1] += r["tokens"]
    groups = sorted({g for by_group in sums.values() for g in by_group})
    lines = ["", "Held-out loss per group (tokens pooled over replicates):", "",
             "| budget | method | " + " | ".join(f"`{g}`" for g in groups) + " |", "|---|---|" + "---|" * len(groups)]
    for cell_name in sorted(sums, key=lambda c: (int(c.split("@")[1]), c)):
        method, budget = cell_name.split("@")
        by_group = sums[cell_name]
        lines.append(f"| {budget} | {method} | " + " | ".join(
            f"{by_group[g][0] / by_group[g][1]:.2f}" if g in by_group else "-" for g in groups) + " |")
    return lines


def _heldout_losses(cells: list[dict]) -> tuple[list, np.ndarray, np.ndarray]:
    """(held-out ids, loss sums [replicate, example], tokens) of one method's replicates."""
    from sftcurate.core.evaluate import replicate_losses

    ids, loss, tokens, _ = replicate_losses([c["eval_uri"] for c in cells])
    return ids, loss, tokens


def _cells(summary: dict, method: str, budget: int) -> list[dict]:
    return [c for n, c in sorted(summary["cells"].items()) if n.split("#")[0] == f"{method}@{budget}"]


def gate_lines(summary: dict, pool: list[dict], ungated: dict | None) -> list[str]:
    """What the gate dropped (its damage kinds against the pool's), and gated uniform against the ungated
    uniform of the same pool, held-out examples and seeds (paired per example and replicate)."""
    import pyarrow.parquet as pq

    from sftcurate.core import evidence
    from sftcurate.infra.store import join

    gated_uri = next(iter(summary["cells"].values()))["examples_uri"]
    kept = {int(o.rsplit("line ", 1)[1]) for o in
            pq.read_table(join(gated_uri, "examples.parquet"), columns=["origin"]).column("origin").to_pylist()}
    train = [(i + 1, r) for i, r in enumerate(pool) if r["split"] == "train"]
    dropped = [r for line, r in train if line not in kept]
    kinds = sorted({r["damage"] for _, r in train})
    share = {k: (sum(r["damage"] == k for r in dropped) / max(len(dropped), 1),
                 sum(r["damage"] == k for _, r in train) / len(train)) for k in kinds}
    damaged = 1 - share.get("clean", (0.0, 0.0))[0], 1 - share.get("clean", (0.0, 0.0))[1]
    lines = ["", f"The gate ({json.dumps(GATE)}) dropped {len(dropped)} of {len(train)} training records, "
             f"{damaged[0]:.0%} of them damaged (the pool: {damaged[1]:.0%}). Share of each kind among the dropped "
             "(the pool's own share in brackets): "
             + ", ".join(f"{k} {a:.0%} ({b:.0%})" for k, (a, b) in share.items()) + "."]
    if ungated is None:
        return lines + ["", "Gated against ungated uniform: the `faq-noisy` summary is not here, not computed."]
    return lines + ["", "Gated uniform against the ungated uniform of `faq-noisy` (held-out loss, paired per "
                    "held-out example and replicate):", ""] + paired_table(
        [(b, "gated uniform", _cells(summary, "uniform", b), "ungated uniform", _cells(ungated, "uniform", b))
         for b in summary["budgets"] if _cells(ungated, "uniform", b)])


def paired_table(pairs: list[tuple]) -> list[str]:
    """Rows of (budget, name a, cells a, name b, cells b) from two runs with the same held-out examples and
    seeds: each side's held-out loss and a - b, paired per held-out example and replicate."""
    from sftcurate.core import evidence

    lines = ["| budget | a | held-out loss | b | held-out loss | a - b |", "|---|---|---|---|---|---|"]
    for budget, name_a, cells_a, name_b, cells_b in pairs:
        ids_a, loss_a, tokens = _heldout_losses(cells_a)
        ids_b, loss_b, _ = _heldout_losses(cells_b)
        assert ids_a == ids_b, "the two runs were evaluated on different held-out examples"
        diff = evidence.paired_difference(loss_a, loss_b, tokens)
        lines.append(f"| {budget} | {name_a} | {evidence.token_mean(loss_a, tokens):.4f} | {name_b} | "
                     f"{evidence.token_mean(loss_b, tokens):.4f} | {diff.mean:+.4f} [{diff.low:+.4f}, "
                     f"{diff.high:+.4f}] {evidence.verdict(diff, min(len(cells_a), len(cells_b)))} |")
    return lines


def oracle_lines(summary: dict, targeted: dict | None) -> list[str]:
    """Uniform over the target's groups against every method of `iso-targeted` at the same loss tokens."""
    if targeted is None:
        return ["", "Against `iso-targeted`: its summary is not here, not computed."]
    pairs = [(f"{b} ({t:,} tokens)", "uniform over the target's groups", _cells(summary, "uniform", t), m,
              _cells(targeted, m, b))
             for b, t in zip(targeted["budgets"], summary["budgets"]) for m in targeted["methods"]]
    return ["", "Uniform over the target's groups (this run) against each method of `iso-targeted` at the same "
            "loss tokens (held-out loss, paired per held-out example and replicate; below 0: the reference is "
            "better):", ""] + paired_table(pairs)


def regime_section(name: str, pool: list[dict], summary: dict, before: dict | None = None) -> str:
    """`before`: the summary of the run this regime is read against (AFTER), when it has one."""
    rows = {(r["method"], r["budget"]): r for r in summary["rows"]}
    held = Counter(r["group"] for r in pool if r["split"] == "heldout")
    lines = [f"### `{name}`: {sum(r['split'] == 'train' for r in pool):,} training records, held out "
             f"{dict(sorted(held.items()))}", "",
             "| budget | method | held-out loss | vs uniform | balanced-target loss | vs uniform | worst group: loss "
             "| on uniform's worst group, vs uniform | answers right (%) | vs uniform (points) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [regime_row(rows[(m, b)]) for b in summary["budgets"] for m in summary["methods"]]
    base = rows[("base", 0)]
    lines += group_losses_table(summary)
    lines += picks_table(summary, pool)
    if name.endswith("gated"):
        lines += gate_lines(summary, pool, before)
    if name.endswith("oracle"):
        lines += oracle_lines(summary, before)
    lines += ["", f"Base model: held-out loss {base['heldout_loss']:.4f}, balanced {base['balanced_loss']:.4f}. "
              f"Token compute per cell: {json.dumps(summary['train_tokens'])} loss tokens; {summary['replicates']} "
              "replicates.", ""]
    return "\n".join(lines)


def written_sections(path: Path) -> dict[str, str]:
    """The regime sections the results block already holds, by regime name."""
    text = path.read_text() if path.exists() else ""
    if START not in text or END not in text:
        return {}
    block = text[text.index(START):text.index(END)]
    chunks = block.split("\n### `")[1:]
    return {c.split("`", 1)[0]: "### `" + c.rstrip("\n") + "\n" for c in chunks}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--regimes", nargs="*", choices=list(CPU), default=list(CPU))
    ap.add_argument("--work", default=str(REPO / ".sftcurate" / "evidence"))
    ap.add_argument("--write-only", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="every code path at tiny sizes; writes to --work only")
    args = ap.parse_args()

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)   # before the import below reads where the home is

    import torch

    import sftcurate.infra  # noqa: F401  (quiet, offline environment defaults before Prefect starts)
    from sftcurate.flows.compare import compare
    from sftcurate.infra.env import ensure_home

    ensure_home()                             # the Prefect database lives there: it must exist before a flow runs
    gpu = torch.cuda.is_available()
    parts, start = [], time.time()
    kept = written_sections(REPO / "docs" / "EVIDENCE.md")
    for name in CPU:   # every regime with a result: those run now, and the others from their saved summaries
        saved = work / f"regime-{name}-summary.json"
        run_now = name in args.regimes and not args.write_only
        if not run_now and not saved.exists():
            # a regime run in another checkout keeps the section it wrote: its summary and store are not here
            parts += [kept[name]] if name in kept else []
            continue
        pool, target = build(name, work, gpu, args.smoke)
        if not run_now:
            summary = json.loads(saved.read_text())
        else:
            data, target_file = work / f"regime-{name}.jsonl", work / f"regime-{name}-target.jsonl"
            data.write_text("".join(json.dumps(r) + "\n" for r in pool))
            target_file.write_text("".join(json.dumps(r) + "\n" for r in target))
            s = CPU[name]
            budgets = [b * (GPU_SCALE if gpu else 1) for b in s["budgets"]]
            if name.endswith("oracle"):   # the loss tokens iso-targeted's uniform trained on, once per epoch
                targeted = json.loads((work / "regime-iso-targeted-summary.json").read_text())
                budgets = [round(targeted["train_tokens"][str(b)] / EPOCHS) for b in targeted["budgets"][:len(budgets)]]
            methods = methods_for(name)
            cfg = compare_config(name, data, target_file if target and "similarity" in methods else None, budgets,
                                 s["unit"], methods, args.smoke)
            print(f"{name}: {len(pool)} records, methods {methods}", flush=True)
            summary = compare(cfg)
            saved.write_text(json.dumps(summary, indent=2, default=str))
            print(summary["table_markdown"], flush=True)
        before = work / f"regime-{AFTER.get(name)}-summary.json"
        parts.append(regime_section(name, pool, summary,
                                    json.loads(before.read_text()) if name in AFTER and before.exists() else None))
        how = ("--write-only from saved summaries" if args.write_only
               else f"this run {(time.time() - start) / 60:.0f} min")
        generated = (f"{START}\n## Regimes: results (`python benchmarks/bench_regimes.py`, "
                     f"{time.strftime('%Y-%m-%d')}, {how})\n\n" + "\n".join(parts) + f"\n{END}\n")
        out = work / "EVIDENCE-smoke.md" if args.smoke else REPO / "docs" / "EVIDENCE.md"
        replace_generated(out, generated, "# Evidence", START, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
