"""Variants of FisherSFT and S2L on a development corpus, to choose defaults without touching the reported splits.

The corpus is `python-tutorial` (the Python tutorial cut into sections, group = chapter), from the same Debian
`python3.11-doc` package as `bench_evidence.py` but none of its pages: the reported corpora (`python-faq`,
`python-howto`) are never read here, so nothing is tuned on their held-out splits.

1. Diagnostics of the target's real token features (SmolLM2-135M pre-logit states): token-norm spread, `lam`
   against the variance per direction, the spectrum's concentration, how much of a sentence's log det its
   largest token carries.
2. Each variant through the `compare` flow at one token budget with R replicates: held-out loss against uniform
   (paired interval), worst group, coverage, mean loss tokens per pick. Uniform's cells are built once and
   reused by every variant (the store is the cache).

Writes docs/VARIANTS.md between the generated markers, whatever the outcome.

    python benchmarks/bench_variants.py                  # about 30-40 minutes on a 2-core CPU
    python benchmarks/bench_variants.py --replicates 1   # a smoke run
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_evidence import END, REPO, START, replace_generated, doc_sources, sections  # noqa: E402

FISHER_VARIANTS = {
    "paper (lam 1)": {},
    "unit-norm tokens": {"token_norm": "unit"},
    "relative lam": {"lam_mode": "relative"},
    "whitened": {"whiten": True},
    "unit-norm + relative lam": {"token_norm": "unit", "lam_mode": "relative"},
}
S2L_VARIANTS = {"8 clusters": {"clusters": 8}, "16 clusters": {"clusters": 16}, "32 clusters": {"clusters": 32}}


def tutorial_records(src: Path) -> list[dict]:
    records = []
    for page in sorted((src / "tutorial").glob("*.rst.txt")):
        group = page.name.split(".")[0]
        parts = sections(page)
        if not parts or group == "index":
            continue
        chapter = parts[0][0]
        for heading, body in parts[1:] or parts:
            if len(body) >= 200:
                records.append({"instruction": f"{chapter}: {heading}", "input": "", "output": body[:2000],
                                "group": group})
    return records


def config(data: Path, method: str, params: dict, budget: int, replicates: int, epochs: int):
    from sftcurate.core.config import CompareConfig

    return CompareConfig.model_validate({
        "name": "variants-python-tutorial",
        "source": {"uri": str(data), "group_field": "group", "heldout_fraction": 0.15},
        "models": {"target": "builtin:smollm2-135m-instruct", "proxy": "tiny-gpt2", "max_length": 256},
        "proxy": {"steps": 200, "checkpoints": 8, "batch_size": 16},
        "methods": [method], "params": {method: params},
        "budget_unit": "tokens", "budgets": [budget], "epochs": epochs, "replicates": replicates,
        "reference_full": False,
        "finetune": {"batch_size": 8, "learning_rate": 1e-3, "checkpoint_every": 20},
        "judge": {"backend": "hf", "model": "builtin:smollm2-135m-instruct", "max_prompts": 4, "max_new_tokens": 24},
        "seed": 0,
    })


def diagnostics(data: Path) -> dict:
    from sftcurate.core.config import CurateConfig
    from sftcurate.core.fisher_features import feature_diagnostics
    from sftcurate.core.inputs import read_features_artifact
    from sftcurate.flows.curate import ingest_pool
    from sftcurate.tasks.curate import produce_inputs

    cfg = CurateConfig.model_validate({
        "source": {"uri": str(data), "group_field": "group", "heldout_fraction": 0.15},
        "selection": {"method": "fishersft", "budget": 10},
        "models": {"target": "builtin:smollm2-135m-instruct", "max_length": 256}})
    examples_uri = ingest_pool(cfg)
    uris = produce_inputs(("token_features",), examples_uri, cfg, None, lambda name: nullcontext())
    features, offsets = read_features_artifact(uris["token_features"])[:2]
    return feature_diagnostics(features, offsets, lam=1.0)


def row_line(label: str, method: str, row: dict, pick_tokens: float) -> str:
    delta = f"{row['delta_vs_uniform']:+.4f} [{row['delta_ci_low']:+.4f}, {row['delta_ci_high']:+.4f}]"
    worst = ((row.get("worst_group_verdict") or "-") if row.get("worst_group_delta") is None else
             f"{row['worst_group_delta']:+.4f} [{row['worst_group_delta_ci_low']:+.4f}, "
             f"{row['worst_group_delta_ci_high']:+.4f}] {row['worst_group_verdict']}")
    return (f"| {method} | {label} | {row['heldout_loss']:.4f} | {delta} | {row['verdict']} | "
            f"{row['worst_group']}: {row['worst_group_loss']:.4f} | {worst} | {row['groups_covered']}/{row['groups']} "
            f"| {pick_tokens:.0f} |")


def mean_pick_tokens(summary: dict, method: str, budget: int) -> float:
    from sftcurate.core.selection import load_selection

    table, _ = load_selection(summary["cells"][f"{method}@{budget}"]["selection_uri"])
    tokens = table.column("tokens").to_pylist()
    return sum(tokens) / max(len(tokens), 1)


def write(lines: list[str], diag: dict, s: dict, seconds: float) -> Path:
    out = REPO / "docs" / "VARIANTS.md"
    diag_rows = "\n".join(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in diag.items())
    generated = (f"{START}\n## Results (generated by `python benchmarks/bench_variants.py`, {time.strftime('%Y-%m-%d')};"
                 f" the last invocation took {seconds / 60:.0f} min)\n\nCorpus `python-tutorial`: {s['records']} records, "
                 f"{s['groups']} groups. Budget {s['budget']} loss tokens, epochs {s['epochs']}, {s['replicates']} "
                 f"replicates, SmolLM2-135M-Instruct with LoRA.\n\n### Token features of the target (lam = 1)\n\n"
                 f"| statistic | value |\n|---|---|\n{diag_rows}\n\n### Variants against uniform\n\n"
                 "| method | variant | held-out loss | vs uniform [95%] | verdict | worst group | vs uniform on its worst "
                 "group [95%] | groups covered | mean loss tokens per pick |\n|---|---|---|---|---|---|---|---|---|\n" + "\n".join(lines) + f"\n{END}\n")
    return replace_generated(out, generated, "# Variants")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=int, default=3000)
    parser.add_argument("--replicates", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--only", nargs="*", help="run only these variants (labels); the others are read back "
                        "from earlier runs, so the machine can be shared between variants")
    parser.add_argument("--work", default=str(REPO / ".sftcurate" / "evidence"))
    args = parser.parse_args()

    import sftcurate.infra  # noqa: F401  (quiet, offline environment defaults before Prefect starts)
    from sftcurate.flows.compare import compare

    work = Path(args.work)
    saved = work / "variants"
    saved.mkdir(parents=True, exist_ok=True)
    records = tutorial_records(doc_sources(work))
    data = work / "python-tutorial.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    s = {"records": len(records), "groups": len({r["group"] for r in records}), "budget": args.budget,
         "epochs": args.epochs, "replicates": args.replicates}
    print(f"python-tutorial: {s['records']} records, {s['groups']} groups", flush=True)
    start = time.time()
    diag_file = saved / "diagnostics.json"
    if not diag_file.exists():
        diag_file.write_text(json.dumps(diagnostics(data), indent=1))
    diag = json.loads(diag_file.read_text())
    lines: list[str] = []
    for method, variants in (("fishersft", FISHER_VARIANTS), ("s2l", S2L_VARIANTS)):
        for label, params in variants.items():
            result = saved / f"{method}-{label.replace(' ', '_')}-{args.budget}-{args.replicates}.json"
            if not result.exists() and (args.only is None or label in args.only):
                summary = compare(config(data, method, params, args.budget, args.replicates, args.epochs))
                result.write_text(json.dumps({
                    "row": next(r for r in summary["rows"] if r["method"] == method),
                    "uniform": next(r for r in summary["rows"] if r["method"] == "uniform"),
                    "pick_tokens": mean_pick_tokens(summary, method, args.budget),
                    "uniform_pick_tokens": mean_pick_tokens(summary, "uniform", args.budget)}, default=str))
            if not result.exists():
                continue
            done = json.loads(result.read_text())
            if not lines:
                lines.append(row_line("-", "uniform", {**done["uniform"], "delta_vs_uniform": 0.0,
                                                       "delta_ci_low": 0.0, "delta_ci_high": 0.0, "verdict": "-"},
                                      done["uniform_pick_tokens"]))
            lines.append(row_line(label, method, done["row"], done["pick_tokens"]))
            print(lines[-1], flush=True)
    out = write(lines, diag, s, time.time() - start)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
