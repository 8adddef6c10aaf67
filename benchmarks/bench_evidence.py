"""Evidence: does a FisherSFT or S2L selection beat a random sample of the same loss tokens, on real data?

Two real corpora with a group column (and two pools made from them), from Python's own documentation
as Debian ships it (package `python3.11-doc`, fetched with `apt-get download` when it is not on disk; nothing
else is downloaded):

- `python-faq`: the Python FAQ, every question and its answer; group = the FAQ page (general, programming,
  design, library, extending, windows, gui, installed).
- `python-howto`: the HOWTO guides cut into sections; prompt = guide and section title, response = the section
  text; group = the guide.
- `python-faq-redundant`: python-faq whose largest training group (programming) is over-represented by
  near-copies (3 templated rephrasings of each question, same answer), the held-out split unchanged: the pool a
  templating data generator leaves, where a sample of the pool's own distribution is no longer the target's.
- `python-howto-redundant`: python-howto by the same rule (its largest training group, logging-cookbook, gets 3
  near-copies of each section), the confirming pool registered in docs/EVIDENCE.md before it was run.

Each corpus runs the `compare` flow with the built-in SmolLM2-135M-Instruct as target (LoRA), every selector
plus the reference rows (base model, uniform, the full pool at the same token compute), R replicates and two
token budgets. The defaults of the selectors are the shipped ones (nothing here is tuned on these held-out
splits). The result is written to docs/EVIDENCE.md between the generated markers whatever it says, with the
report PNG of each corpus; the analysis above the markers is written by hand from these numbers.

    python benchmarks/bench_evidence.py            # the full run (about three hours on a 2-core CPU)
    python benchmarks/bench_evidence.py --corpora python-faq-redundant   # one pool (41 min)
    python benchmarks/bench_evidence.py --quick    # one corpus, one budget, 2 replicates (minutes)

On a GPU (`SFTCURATE_DEVICE=cuda` or detected) it uses larger budgets and more replicates.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC_ROOT = "usr/share/doc/python3.11/html/_sources"
HEADING = re.compile(r"^(=+|-+|\^+|~+|\*+)$")
START, END = "<!-- generated:start -->", "<!-- generated:end -->"


# ---------------------------------------------------------------- the corpora

def doc_sources(cache: Path) -> Path:
    """The reStructuredText sources of the Python docs: from an installed python3.11-doc, else from the .deb."""
    installed = Path("/") / DOC_ROOT
    if installed.exists():
        return installed
    unpacked = cache / "python3.11-doc" / DOC_ROOT
    if not unpacked.exists():
        work = Path(tempfile.mkdtemp())
        subprocess.run(["apt-get", "download", "python3.11-doc"], cwd=work, check=True, capture_output=True)
        deb = next(work.glob("python3.11-doc_*.deb"))
        (cache / "python3.11-doc").mkdir(parents=True, exist_ok=True)   # dpkg-deb -x makes no parent folders
        subprocess.run(["dpkg-deb", "-x", str(deb), str(cache / "python3.11-doc")], check=True)
        shutil.rmtree(work, ignore_errors=True)
    return unpacked


def clean_rst(text: str) -> str:
    text = re.sub(r":\w+:`~?([^`<]*?)(?:\s*<[^>]*>)?`", r"\1", text)        # :mod:`x <y>` -> x
    text = re.sub(r"`([^`<]+?)\s*<[^>]+>`_+", r"\1", text)                  # `label <url>`_ -> label
    text = re.sub(r"``([^`]+)``", r"\1", text)
    text = re.sub(r"^\.\. [^\n]*(\n[ \t]+[^\n]*)*", "", text, flags=re.M)   # directives and their options
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def sections(path: Path) -> list[tuple[str, str]]:
    """(heading, body) of every titled section of an .rst file, bodies cleaned."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out, title, body = [], None, []
    for i, line in enumerate(lines):
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if line.strip() and HEADING.match(nxt.strip()) and len(nxt.strip()) >= len(line.strip()) * 0.8:
            if title is not None:
                out.append((title, clean_rst("\n".join(body))))
            title, body = clean_rst(line.strip()), []
        elif not HEADING.match(line.strip()) or not line.strip():
            body.append(line)
    if title is not None:
        out.append((title, clean_rst("\n".join(body))))
    return out


def faq_records(src: Path) -> list[dict]:
    records = []
    for page in sorted((src / "faq").glob("*.rst.txt")):
        group = page.name.split(".")[0]
        if group == "index":
            continue
        for question, answer in sections(page):
            if question.endswith("?") and len(answer) >= 80:
                records.append({"instruction": question, "input": "", "output": answer[:2000], "group": group})
    return records


def howto_records(src: Path) -> list[dict]:
    records = []
    for page in sorted((src / "howto").glob("*.rst.txt")):
        group = page.name.split(".")[0]
        parts = sections(page)
        if not parts:
            continue
        guide = parts[0][0]
        for heading, body in parts[1:]:
            if len(body) >= 200:
                records.append({"instruction": f"{guide}: {heading}", "input": "", "output": body[:2000],
                                "group": group})
    return records


# Prompt templates for a redundant pool's near-copies: the same answer asked again in other words, as a
# templated or paraphrasing data generator produces them (exact copies would be removed at ingest).
FAQ_COPY_TEMPLATES = ["Question: {q}", "Q: {q}", "FAQ: {q}", "Please answer this Python FAQ: {q}", "{q} (Python FAQ)",
                      "Could you explain this? {q}", "I have a question about Python. {q}", "Python question: {q}"]
# python-howto's prompts are "guide: section title"; its templates were written before its run, like the FAQ's.
HOWTO_COPY_TEMPLATES = ["HOWTO: {q}", "Python HOWTO, {q}", "Explain this part of the Python docs: {q}",
                        "Section of a Python HOWTO guide: {q}", "{q} (Python HOWTO)", "Tell me about {q}",
                        "Documentation request: {q}", "Python how-to: {q}"]
COPIES = 3


def redundant_records(records: list[dict], templates: list[str], heldout_fraction: float = 0.15) -> list[dict]:
    """`records` with their largest group over-represented by near-copies: every training record of the group with
    the most training records gets COPIES more records with the same answer and a templated prompt. Copies are
    made only of records in the training split, and only with templates whose example id also falls in it, so
    the held-out split is exactly the corpus's own (same records, same distribution) and no copy of a held-out
    record is ever trained on. The group is fixed by the training split's sizes alone."""
    from collections import Counter

    from sftcurate.core.ingest import example_id, is_heldout

    held = is_heldout([example_id(r["instruction"], r["output"]) for r in records], heldout_fraction)
    train = [r for r, h in zip(records, held) if not h]
    group = Counter(r["group"] for r in train).most_common(1)[0][0]
    copies = []
    for r in train:
        if r["group"] != group:
            continue
        prompts = [t.format(q=r["instruction"]) for t in templates]
        kept = [q for q, h in zip(prompts, is_heldout([example_id(q, r["output"]) for q in prompts],
                                                      heldout_fraction)) if not h]
        copies += [dict(r, instruction=q) for q in kept[:COPIES]]
    return records + copies


def faq_redundant_records(src: Path) -> list[dict]:
    return redundant_records(faq_records(src), FAQ_COPY_TEMPLATES)


def howto_redundant_records(src: Path) -> list[dict]:
    return redundant_records(howto_records(src), HOWTO_COPY_TEMPLATES)


CORPORA = {"python-faq": faq_records, "python-howto": howto_records, "python-faq-redundant": faq_redundant_records,
           "python-howto-redundant": howto_redundant_records}


# ---------------------------------------------------------------- the runs

def settings(quick: bool, gpu: bool) -> dict:
    if gpu:
        return {"corpora": list(CORPORA), "budgets": [8000, 16000], "replicates": 5, "epochs": 3}
    if quick:
        return {"corpora": ["python-faq"], "budgets": [3000], "replicates": 2, "epochs": 2}
    return {"corpora": list(CORPORA), "budgets": [3000, 6000], "replicates": 3, "epochs": 3}


def compare_config(name: str, data: Path, s: dict):
    from sftcurate.core.config import CompareConfig

    return CompareConfig.model_validate({
        "name": f"evidence-{name}",
        "source": {"uri": str(data), "group_field": "group", "heldout_fraction": 0.15},
        "models": {"target": "builtin:smollm2-135m-instruct", "proxy": "tiny-gpt2", "max_length": 256},
        "proxy": {"steps": 200, "checkpoints": 8, "batch_size": 16},
        "methods": ["fishersft", "s2l"], "params": {"s2l": {"clusters": 16}},
        "budget_unit": "tokens", "budgets": s["budgets"], "epochs": s["epochs"], "replicates": s["replicates"],
        "reference_full": True,
        "finetune": {"batch_size": 8, "learning_rate": 1e-3, "checkpoint_every": 20},
        "judge": {"backend": "hf", "model": "builtin:smollm2-135m-instruct", "domain": "Python documentation",
                  "max_prompts": 12, "max_new_tokens": 48},
        "seed": 0,
    })


def corpus_summary(name: str, records: list[dict], summary: dict) -> str:
    rows = {(r["method"], r["budget"]): r for r in summary["rows"]}
    groups = sorted({r["group"] for r in records})
    lines = [f"### `{name}`: {len(records)} records, {len(groups)} groups ({', '.join(groups)})", "",
             "| budget (loss tokens) | method | held-out loss [95%] | vs uniform [95%] | verdict | worst group: loss "
             "| vs uniform on its worst group of >= 5 held-out examples [95%] | groups covered |", "|---|---|---|---|---|---|---|---|"]
    for b in summary["budgets"]:
        for m in summary["methods"]:
            r = rows[(m, b)]
            delta = ("-" if r["delta_vs_uniform"] is None else
                     f"{r['delta_vs_uniform']:+.4f} [{r['delta_ci_low']:+.4f}, {r['delta_ci_high']:+.4f}]")
            worst = ((r.get("worst_group_verdict") or "-") if r.get("worst_group_delta") is None else
                     f"{r['uniform_worst_group']}: {r['worst_group_delta']:+.4f} [{r['worst_group_delta_ci_low']:+.4f}, "
                     f"{r['worst_group_delta_ci_high']:+.4f}] {r['worst_group_verdict']}")
            lines.append(f"| {b} | {m} | {r['heldout_loss']:.4f} [{r['loss_ci_low']:.4f}, {r['loss_ci_high']:.4f}] "
                         f"| {delta} | {r['verdict'] or '-'} | {r['worst_group']}: {r['worst_group_loss']:.4f} "
                         f"| {worst} | {r['groups_covered']}/{r['groups']} |")
    lines += composition(summary)
    base = rows[("base", 0)]
    sanity = summary["judge_sanity"]
    lines += ["", f"Base model: {base['heldout_loss']:.4f} [{base['loss_ci_low']:.4f}, {base['loss_ci_high']:.4f}]. "
              f"Token compute per cell: {json.dumps(summary['train_tokens'])} loss tokens; "
              f"{summary['replicates']} replicates. Judge sanity (SmolLM2-135M on known pairs): accuracy "
              f"{sanity['accuracy']:.2f}, position bias {sanity['position_bias']:.2f}, "
              f"{'trusted' if sanity['trusted'] else 'not trusted: its win rates are not evidence'}.", "",
              f"![{name}](evidence-{name}.png)", ""]
    return "\n".join(lines)


def composition(summary: dict) -> list[str]:
    """What each method picked, read back from the stored selections: examples, the share of the training pool's
    largest group, and repeated answers (picks whose response an earlier pick of the same selection already had:
    near-copies). Means over replicates."""
    import pyarrow.parquet as pq

    from sftcurate.infra.store import join

    cells = {k: v for k, v in summary["cells"].items() if "@" in k}
    try:
        first = next(iter(cells.values()))
        pool = pq.read_table(join(first["examples_uri"], "examples.parquet"),
                             columns=["id", "response", "group", "split"]).to_pandas().set_index("id")
    except (FileNotFoundError, StopIteration):
        return ["", "(selections not in this store: composition not shown)"]
    train = pool[pool["split"] == "train"]
    largest = train["group"].value_counts().idxmax()
    out = {}
    for name, cell in cells.items():
        method, budget = name.split("@")[0], int(name.split("@")[1].split("#")[0])
        picked = pool.loc[pq.read_table(join(cell["selection_uri"], "selection.parquet"),
                                        columns=["id"]).column("id").to_pylist()]
        out.setdefault((budget, method), []).append(
            (len(picked), float((picked["group"] == largest).mean()), int(picked["response"].duplicated().sum())))
    lines = ["", f"Picks (mean over replicates): examples, share of `{largest}` (the training pool's largest group, "
             f"{(train['group'] == largest).mean():.0%} of it; {(pool[pool['split'] == 'heldout']['group'] == largest).mean():.0%} "
             "of the held-out examples), repeated answers.", "",
             "| budget | method | examples | largest group's share | repeated answers |", "|---|---|---|---|---|"]
    for (budget, method), v in sorted(out.items(), key=lambda kv: (kv[0][0], summary["methods"].index(kv[0][1])
                                                                  if kv[0][1] in summary["methods"] else 99)):
        n, share, rep = (sum(x[i] for x in v) / len(v) for i in range(3))
        lines.append(f"| {budget} | {method} | {n:.1f} | {share:.2f} | {rep:.1f} |")
    return lines


def redraw_plot(name: str, summary: dict) -> None:
    """The report's plot drawn again from a saved summary's rows with today's plotting code (same numbers)."""
    from types import SimpleNamespace

    from sftcurate.core.report import plot_png

    cfg = SimpleNamespace(budget_unit=summary["budget_unit"], budgets=summary["budgets"])
    (REPO / "docs" / f"evidence-{name}.png").write_bytes(plot_png(cfg, summary["rows"], summary["methods"]))


def replace_generated(out: Path, generated: str, title: str, start: str = START, end: str = END) -> Path:
    """Put `generated` (start ... end) into the markdown file `out` in place of its previous generated section,
    keeping the hand-written analysis around it; a new file starts with `title`."""
    text = out.read_text() if out.exists() else f"{title}\n\n"
    if start in text and end in text:
        text = text[:text.index(start)] + generated + text[text.index(end) + len(end) + 1:]
    else:
        text = text.rstrip() + "\n\n" + generated
    out.write_text(text)
    return out


def write_evidence(sections_md: list[str], s: dict, seconds: float, quick: bool, write_only: bool = False) -> Path:
    out = REPO / "docs" / "EVIDENCE.md"
    how = ("written by `python benchmarks/bench_evidence.py --write-only` from the summaries the runs saved" if
           write_only else f"generated by `python benchmarks/bench_evidence.py{' --quick' if quick else ''}`")
    took = "" if write_only else f", {seconds / 60:.0f} min on this machine, reusing every stage already in the store"
    head = (f"{START}\n## Results ({how}, {time.strftime('%Y-%m-%d')}{took})\n\n"
            f"Settings: budgets {s['budgets']} loss tokens, epochs {s['epochs']}, {s['replicates']} replicates, "
            f"target SmolLM2-135M-Instruct with LoRA, selectors at their shipped defaults (S2L with 16 clusters for "
            f"pools of a few hundred).\n\n")
    generated = head + "\n".join(sections_md) + f"\n{END}\n"
    return replace_generated(out, generated, "# Evidence")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--work", default=str(REPO / ".sftcurate" / "evidence"), help="corpora and cached data")
    parser.add_argument("--corpora", nargs="*", choices=list(CORPORA), help="only these corpora")
    parser.add_argument("--write-only", action="store_true",
                        help="write docs/EVIDENCE.md from the summaries a previous run saved, run nothing")
    args = parser.parse_args()

    import torch

    import sftcurate.infra  # noqa: F401  (quiet, offline environment defaults before Prefect starts)
    from sftcurate.flows.compare import compare
    from sftcurate.infra.store import join, read_bytes

    gpu = torch.cuda.is_available() or os.environ.get("SFTCURATE_DEVICE", "").startswith("cuda")
    s = settings(args.quick, gpu)
    if args.corpora:
        s["corpora"] = args.corpora
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    src = doc_sources(work)
    start = time.time()
    parts = []
    for name in s["corpora"]:
        records = CORPORA[name](src)
        saved = work / f"{name}-summary.json"
        if args.write_only:
            if not saved.exists():
                print(f"{name}: no saved summary ({saved}); skipped", flush=True)
                continue
            summary = json.loads(saved.read_text())
            redraw_plot(name, summary)
        else:
            data = work / f"{name}.jsonl"
            data.write_text("".join(json.dumps(r) + "\n" for r in records))
            print(f"{name}: {len(records)} records -> {data}", flush=True)
            summary = compare(compare_config(name, data, s))
            (REPO / "docs" / f"evidence-{name}.png").write_bytes(read_bytes(join(summary["report_uri"],
                                                                                   "results.png")))
            saved.write_text(json.dumps(summary, indent=2, default=str))
            print(summary["table_markdown"], flush=True)
        parts.append(corpus_summary(name, records, summary))
        out = write_evidence(parts, s, time.time() - start, args.quick, args.write_only)  # partial runs count
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
