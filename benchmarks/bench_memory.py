"""Peak resident memory of every stage (issue 28, item 7): each stage runs in a process of its own, which prints
its peak RSS (`getrusage`'s ru_maxrss: what GNU `time -v` reports) and its RSS before the stage's work began
(imports and setup), so a peak is pinned to the stage that made it.

Two cases, each in a fresh home (the stages of a case share one store, so a later stage reuses what an earlier
one committed and measures only its own work):

- `long`: one 20 MB record (prompt/response, the response built from Python's own documentation, the built-in
  corpus) in a pool of 300 short ones, the tiny test model (`tiny-gpt2`) as target and proxy, max_length 128:
  ingest (the record in the pool and cut, the default; in the held-out split; with `source.too_long: keep`),
  token features, S2L proxy training and trajectories, a uniform selection, its fine-tune, held-out loss and
  generations. Target: ingest within 1 GB.
- `compare`: a seeded sample of 3,000 short records (documentation paragraphs), the built-in
  SmolLM2-135M-Instruct fine-tuned with LoRA, max_length 128, one cell (uniform at one token budget, one
  replicate): ingest, selection, fine-tune, held-out loss of the fine-tune and of the base model, generations,
  the judge's sanity check; then the whole `compare` flow in one process in a fresh home. Target: within 4 GB.

    python benchmarks/bench_memory.py                 # both cases (about 20 minutes on a loaded 2-core CPU)
    python benchmarks/bench_memory.py --case long     # the 20 MB record only (a few minutes)

Exits non-zero when a target is missed. Memory only: no time is claimed.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GIB = 1024 ** 3
GB = 10 ** 9                   # the targets read in decimal units, the stricter reading of "GB"
INGEST_TARGET = 1 * GB         # ingest of a 20 MB record
COMPARE_TARGET = 4 * GB        # the whole compare flow
RESULT = "RESULT "


# ---------------------------------------------------------------- the data (built-in text only)

def doc_paragraphs() -> list[tuple[str, str]]:
    """(topic, paragraph) of Python's built-in documentation topics (`pydoc_data`), the project's built-in corpus."""
    from pydoc_data.topics import topics

    return [(name, p.strip()) for name in sorted(topics) for p in topics[name].split("\n\n") if len(p.strip()) >= 80]


def short_records(n: int | None) -> list[dict]:
    paragraphs = doc_paragraphs()
    records = [{"prompt": f"Explain this part of the Python reference on '{topic}' (paragraph {i}).",
                "response": text[:600]} for i, (topic, text) in enumerate(paragraphs)]
    return records if n is None else records[:n]


def long_response(chars: int) -> str:
    """`chars` characters of documentation, the topics repeated in order (a real text, not one repeated token)."""
    from pydoc_data.topics import topics

    body = "\n\n".join(topics[name] for name in sorted(topics))
    return (body * (chars // len(body) + 1))[:chars]


def long_record(chars: int, heldout: bool, fraction: float) -> dict:
    """The long record, its prompt chosen so that the id-hash split puts it where `heldout` says."""
    from sftcurate.core.ingest import example_id, is_heldout

    response = long_response(chars)
    for attempt in range(1000):
        prompt = f"Summarise the Python documentation (version {attempt})."
        if bool(is_heldout([example_id(prompt, response)], fraction)[0]) == heldout:
            return {"prompt": prompt, "response": response}
    raise RuntimeError("no prompt put the long record where it was asked to be")


def write_jsonl(path: Path, records: list[dict]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return str(path)


# ---------------------------------------------------------------- the configs

def long_config(data: Path, mb: int, heldout: bool = False, too_long: str = "cut") -> dict:
    name = f"long-{'heldout' if heldout else 'pool'}-{too_long}.jsonl"
    path = data / name
    if not path.exists():
        write_jsonl(path, short_records(300) + [long_record(mb * 1_000_000, heldout, 0.1)])
    return {"name": "bench-memory-long", "source": {"uri": str(path), "heldout_fraction": 0.1, "too_long": too_long},
            "models": {"target": "tiny-gpt2", "proxy": "tiny-gpt2", "max_length": 128},
            "proxy": {"steps": 40, "checkpoints": 4, "batch_size": 16},
            "methods": ["uniform"], "budgets": [2000], "budget_unit": "tokens", "epochs": 1, "replicates": 1,
            "reference_full": False, "finetune": {"batch_size": 8, "learning_rate": 1e-3},
            "judge": {"backend": "hf", "model": "tiny-gpt2", "max_prompts": 8, "max_new_tokens": 16}}


def compare_config(data: Path, records: int, budget: int) -> dict:
    path = data / "short.jsonl"
    if not path.exists():
        write_jsonl(path, short_records(None))
    return {"name": "bench-memory-compare",
            "source": {"uri": str(path), "sample": records, "sample_seed": 0, "heldout_fraction": 0.1},
            "models": {"target": "builtin:smollm2-135m-instruct", "proxy": "tiny-gpt2", "max_length": 128},
            "methods": ["uniform"], "budgets": [budget], "budget_unit": "tokens", "epochs": 1, "replicates": 1,
            "reference_full": False, "finetune": {"batch_size": 8, "learning_rate": 1e-3, "checkpoint_every": 50},
            "judge": {"backend": "hf", "model": "builtin:smollm2-135m-instruct", "max_prompts": 8,
                      "max_new_tokens": 32}}


# ---------------------------------------------------------------- one stage, in this process

def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _produce(name: str, examples_uri: str, cfg, upto: str = "commit") -> str | None:
    """A requirement's production as the curate flow runs it, without Prefect (`tasks.curate.produce`)."""
    from sftcurate.core.requirements import requirement

    plan = requirement(name).produce
    prepared = None
    if plan.prepare is not None and (plan.prepare.when is None or plan.prepare.when(cfg)):
        prepared = plan.prepare.run(examples_uri, cfg, None)
    if upto == "prepare":
        return prepared
    shard_uris = [plan.shard.run(examples_uri, cfg, prepared, i) for i in range(plan.shards(examples_uri, cfg))]
    return plan.commit.run(examples_uri, cfg, prepared, shard_uris, None)


def _chain(cfg, stage: str, marks: dict) -> None:
    """The stages up to `stage`: earlier ones are committed already (reused, no work); `marks['start']` is the RSS
    just before `stage`'s own work."""
    from sftcurate.core import requirements  # noqa: F401  (declares the built-in requirements)
    from sftcurate.core.evaluate import evaluate_heldout, generate
    from sftcurate.core.finetune import finetune
    from sftcurate.core.ingest import ingest, source_fingerprint
    from sftcurate.core.judge import judge_sanity
    from sftcurate.core.selection import run_selection, selection_meta
    from sftcurate.core.selectors.base import Budget
    from sftcurate.infra.models import model_fingerprint

    curate = cfg.curate_config("uniform", cfg.budgets[0])
    src, models = curate.source, curate.models
    target, fp = models.target, model_fingerprint(models.target)
    order = ["ingest", "features", "proxy", "trajectories", "select", "finetune", "heldout", "base_heldout",
             "generate", "judge_sanity"]
    wanted = order.index(stage)

    def at(name: str) -> bool:
        if order.index(name) == wanted:
            marks["start"] = _rss()
        return order.index(name) <= wanted

    at("ingest")
    examples = ingest(src, source_fingerprint(src), target, models.max_length, models.template)
    if at("features"):
        _produce("token_features", examples, curate)
    if at("proxy"):
        _produce("trajectories", examples, curate, upto="prepare")
    if at("trajectories"):
        _produce("trajectories", examples, curate)
    if not at("select"):
        return
    selection = run_selection(examples, "uniform", Budget(None, cfg.budgets[0]), cfg.seed, None, {})
    ft = cfg.finetune_config(round(cfg.epochs * selection_meta(selection).selected_tokens))
    if not at("finetune"):
        return
    model = finetune(examples, selection, target, fp, ft)
    if at("heldout"):
        evaluate_heldout(examples, model, target, fp, models.max_length)
    if at("base_heldout"):
        evaluate_heldout(examples, None, target, fp, models.max_length)
    if at("generate") or at("judge_sanity"):
        gens = generate(examples, model, target, fp, cfg.generation_config())
        if at("judge_sanity"):
            judge_sanity(gens, cfg.judge, cfg.seed)


def run_child(stage: str, config_path: str) -> None:
    marks = {"start": _rss()}
    from sftcurate.core.config import CompareConfig

    cfg = CompareConfig.model_validate(json.loads(Path(config_path).read_text()))
    if stage == "compare":
        from sftcurate.flows.compare import compare

        marks["start"] = _rss()
        compare(cfg)
    else:
        _chain(cfg, stage, marks)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(RESULT + json.dumps({"stage": stage, "peak": peak, "start": marks["start"]}), flush=True)


# ---------------------------------------------------------------- the cases, each stage a process

def run_stage(label: str, stage: str, config: dict, home: Path, log: Path) -> dict:
    path = home / f"config-{label}.json"
    path.write_text(json.dumps(config))
    env = dict(os.environ, SFTCURATE_HOME=str(home))
    env.setdefault("SFTCURATE_MODEL_CACHE", str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                                                / "sftcurate" / "models"))
    t0 = time.time()
    with open(log, "a") as out:
        out.write(f"\n==== {label} ({stage})\n")
        out.flush()
        proc = subprocess.run([sys.executable, __file__, "--child", stage, "--config", str(path)], env=env,
                              stdout=subprocess.PIPE, stderr=out, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT)]
    if proc.returncode or not lines:
        raise SystemExit(f"{label}: stage {stage} failed (exit {proc.returncode}); see {log}")
    row = {"label": label, **json.loads(lines[-1][len(RESULT):]), "seconds": round(time.time() - t0, 1)}
    print(f"{label:<38} peak {row['peak'] / GIB:6.2f} GiB   before its work {row['start'] / GIB:5.2f} GiB",
          flush=True)
    return row


def case_long(work: Path, mb: int, log: Path) -> list[dict]:
    data = work / "data"
    data.mkdir(exist_ok=True)
    rows = []
    for label, heldout, too_long in (("ingest, long record in the pool (cut)", False, "cut"),
                                     ("ingest, long record held out", True, "cut"),
                                     ("ingest, long record kept whole (keep)", False, "keep")):
        home = work / f"home-{too_long}-{int(heldout)}"
        home.mkdir(exist_ok=True)
        rows.append(run_stage(label, "ingest", long_config(data, mb, heldout, too_long), home, log))
    home = work / "home-cut-0"
    cfg = long_config(data, mb)
    for stage in ("features", "proxy", "trajectories", "finetune", "heldout", "generate"):
        rows.append(run_stage(f"long: {stage}", stage, cfg, home, log))
    return rows


def case_compare(work: Path, records: int, budget: int, log: Path) -> list[dict]:
    data = work / "data"
    data.mkdir(exist_ok=True)
    cfg = compare_config(data, records, budget)
    home = work / "home-stages"
    home.mkdir(exist_ok=True)
    rows = [run_stage(f"compare: {stage}", stage, cfg, home, log)
            for stage in ("ingest", "select", "finetune", "heldout", "base_heldout", "generate", "judge_sanity")]
    whole = work / "home-flow"
    whole.mkdir(exist_ok=True)
    rows.append(run_stage("compare: the whole flow, one process", "compare", cfg, whole, log))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=["long", "compare", "both"], default="both")
    ap.add_argument("--mb", type=int, default=20, help="size of the long record in MB (10^6 characters)")
    ap.add_argument("--records", type=int, default=3000, help="short records of the compare case")
    ap.add_argument("--budget", type=int, default=4000, help="the compare cell's token budget")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        run_child(args.child, args.config)
        return
    work = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    log = work / "stages.log"
    print(f"work folder {work} (stage logs: {log})", flush=True)
    rows = []
    if args.case in ("long", "both"):
        rows += case_long(work, args.mb, log)
    if args.case in ("compare", "both"):
        rows += case_compare(work, args.records, args.budget, log)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    missed = [f"{r['label']}: {r['peak'] / GB:.2f} GB > {limit / GB:.0f} GB" for r in rows
              for limit in [INGEST_TARGET if r["label"] == "ingest, long record in the pool (cut)" else
                            COMPARE_TARGET if r["stage"] == "compare" else None] if limit and r["peak"] > limit]
    for line in missed:
        print(f"target missed: {line}")
    sys.exit(1 if missed else 0)


if __name__ == "__main__":
    main()
