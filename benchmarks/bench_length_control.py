"""A control of S2L's lead on a redundant pool: uniform samples matched to S2L's length mix.

The rule (registered in docs/EVIDENCE.md before the first run): for each budget b and replicate r, count S2L's
picks in each quintile bin of the training pool's loss-token lengths; draw as many per bin, uniformly without
replacement (`default_rng(7919 + r)`); take them in a random order while they fit in b (the uniform selector's
rule), and fill what is left of b uniformly from the rest of the pool. Fine-tune and evaluate with the cell's
own recipe, seed and token compute; paired intervals against uniform and against S2L, as the report computes
them. Needs the saved run of `bench_evidence.py --corpora CORPUS` (its summary and artifacts).

    python benchmarks/bench_length_control.py          # python-faq-redundant: 6 fine-tunes (~9 min on 2 CPU cores)
    python benchmarks/bench_length_control.py --corpus python-howto-redundant    # the confirming pool
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

CORPUS = "python-faq-redundant"      # where the control was first registered and run
BINS = 5
SEED = 7919


def length_matched(reference: np.ndarray, token_counts: np.ndarray, budget_tokens: int, seed: int) -> list[int]:
    """Pool positions: a uniform sample with `reference`'s count in each length quintile, filled to the budget."""
    from sftcurate.core.selectors.base import Budget, fill_in_order

    rng = np.random.default_rng(seed)
    edges = np.quantile(token_counts, np.arange(1, BINS) / BINS)
    bins = np.searchsorted(edges, token_counts, side="right")
    quota = np.bincount(bins[reference], minlength=BINS)
    draws = np.concatenate([rng.choice(np.flatnonzero(bins == b), min(quota[b], int((bins == b).sum())),
                                       replace=False) for b in range(BINS)])
    picked = fill_in_order(rng.permutation(draws), token_counts, Budget(tokens=budget_tokens))
    left = budget_tokens - int(token_counts[picked].sum())
    rest = rng.permutation(np.setdiff1d(np.arange(len(token_counts)), picked))
    if left > 0:
        picked += fill_in_order(rest, token_counts, Budget(tokens=left))
    return picked


def commit_selection(examples_uri: str, pool, token_counts: np.ndarray, picks: list[int], reference_uri: str,
                     budget: int, seed: int) -> str:
    """The control's picks as a selection artifact (content-keyed like every selection), for the fine-tune."""
    from sftcurate.core.selection import KIND, selection_table
    from sftcurate.core.selectors.base import SelectionResult
    from sftcurate.data_contracts import SELECTION
    from sftcurate.data_contracts.manifests import SelectionMeta
    from sftcurate.infra.stages import build_once

    def build(writer) -> None:
        table = selection_table(SelectionResult(indices=picks), pool, token_counts)
        writer.write_table("selection.parquet", table, SELECTION)
        writer.meta.update({"method": "uniform-length-matched", "budget": None, "token_budget": budget,
                            "seed": seed, "params": {}, "inputs": {}, "model": None, "examples_uri": examples_uri,
                            "pool_size": len(token_counts), "pool_tokens": int(token_counts.sum()),
                            "selected": table.num_rows, "selected_tokens": int(np.asarray(table.column("tokens")).sum()),
                            "objective": None, "info": {"reference": reference_uri, "bins": BINS}})

    return build_once(KIND, "sftcurate.core.selection", {"method": "uniform-length-matched", "token_budget": budget, "seed": seed,
                                       "bins": BINS, "picks": picks}, build,
                      upstream={"examples": examples_uri, "reference": reference_uri}, meta=SelectionMeta)


def heldout(eval_uri: str) -> tuple[np.ndarray, np.ndarray]:
    from sftcurate.core.evaluate import read_heldout_losses

    t = read_heldout_losses(eval_uri)
    return np.asarray(t.column("loss_sum"), dtype=np.float64), np.asarray(t.column("tokens"), dtype=np.float64)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default=str(Path(__file__).resolve().parents[1] / ".sftcurate" / "evidence"))
    parser.add_argument("--corpus", default=CORPUS, help="a pool bench_evidence.py has run (default: %(default)s)")
    args = parser.parse_args()
    corpus = args.corpus

    import sftcurate.infra  # noqa: F401  (quiet, offline environment defaults)
    from bench_evidence import compare_config, settings

    from sftcurate.core import evidence
    from sftcurate.core.evaluate import evaluate_heldout, read_eval
    from sftcurate.core.finetune import finetune
    from sftcurate.core.ingest import load_pool
    from sftcurate.core.selection import build_inputs, load_selection
    from sftcurate.infra.models import model_fingerprint

    work = Path(args.work)
    summary = json.loads((work / f"{corpus}-summary.json").read_text())
    s = settings(quick=False, gpu=False)
    cfg = compare_config(corpus, work / f"{corpus}.jsonl", s)
    target, fingerprint = cfg.models.target, model_fingerprint(cfg.models.target)
    cells = summary["cells"]
    examples_uri = summary["examples_uri"]                      # every cell's pool (checked below)
    pool = load_pool(examples_uri)
    counts = build_inputs(pool, (), {}, None).token_counts
    start = time.time()
    out = {"corpus": corpus, "rule": __doc__.split("\n\n")[1], "budgets": {}}
    lines = ["| budget | control examples (S2L, uniform) | control vs uniform [95%] | verdict | S2L vs control [95%] "
             "| verdict | S2L vs uniform [95%] (as reported) |", "|---|---|---|---|---|---|---|"]
    for budget in summary["budgets"]:
        train_tokens = int(summary["train_tokens"][str(budget)])
        loss = {"uniform": [], "s2l": [], "control": []}
        sizes = {"uniform": [], "s2l": [], "control": []}
        for r in range(summary["replicates"]):
            name = f"@{budget}" + (f"#{r}" if r else "")
            s2l, uni = cells[f"s2l{name}"], cells[f"uniform{name}"]
            if {s2l["examples_uri"], uni["examples_uri"]} != {examples_uri}:
                raise ValueError(f"{name}: the cells were selected from another pool than {examples_uri}")
            reference = np.asarray(load_selection(s2l["selection_uri"])[0].column("index"), dtype=np.int64)
            picks = length_matched(reference, counts, budget, SEED + r)
            selection_uri = commit_selection(examples_uri, pool, counts, picks, s2l["selection_uri"], budget,
                                             SEED + r)
            model_uri = finetune(examples_uri, selection_uri, target, fingerprint,
                                 cfg.finetune_config(train_tokens, r))
            eval_uri = evaluate_heldout(examples_uri, model_uri, target, fingerprint, cfg.models.max_length)
            for key, uri in (("uniform", uni["eval_uri"]), ("s2l", s2l["eval_uri"]), ("control", eval_uri)):
                loss[key].append(heldout(uri)[0])
            sizes["s2l"].append(len(reference))
            sizes["uniform"].append(load_selection(uni["selection_uri"])[1].selected)
            sizes["control"].append(len(picks))
            print(f"{budget} #{r}: control {len(picks)} examples, {int(counts[picks].sum())} tokens, held-out "
                  f"loss {read_eval(eval_uri)['loss']:.4f} "
                  f"({time.time() - start:.0f} s)", flush=True)
        tokens = heldout(eval_uri)[1]
        arr = {k: np.stack(v) for k, v in loss.items()}
        reps = summary["replicates"]
        diffs = {"control-uniform": evidence.paired_difference(arr["control"], arr["uniform"], tokens, 2000, cfg.seed),
                 "s2l-control": evidence.paired_difference(arr["s2l"], arr["control"], tokens, 2000, cfg.seed),
                 "s2l-uniform": evidence.paired_difference(arr["s2l"], arr["uniform"], tokens, 2000, cfg.seed)}
        out["budgets"][budget] = {k: {"mean": d.mean, "low": d.low, "high": d.high,
                                      "verdict": evidence.verdict(d, reps)} for k, d in diffs.items()}
        out["budgets"][budget]["examples"] = {k: float(np.mean(v)) for k, v in sizes.items()}

        def cell(d):
            return f"{d.mean:+.4f} [{d.low:+.4f}, {d.high:+.4f}]"

        lines.append(f"| {budget} | {np.mean(sizes['control']):.1f} ({np.mean(sizes['s2l']):.1f}, "
                     f"{np.mean(sizes['uniform']):.1f}) | {cell(diffs['control-uniform'])} | "
                     f"{evidence.verdict(diffs['control-uniform'], reps)} | {cell(diffs['s2l-control'])} | "
                     f"{evidence.verdict(diffs['s2l-control'], reps)} | {cell(diffs['s2l-uniform'])} |")
    print("\n".join(lines))
    saved = work / f"length-control-{corpus}.json"
    saved.write_text(json.dumps(out, indent=2))
    print(f"{time.time() - start:.0f} s; wrote {saved}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
