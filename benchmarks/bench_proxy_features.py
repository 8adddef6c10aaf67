"""FisherSFT on a small model's features (`embedding.model`, issue 24): what it keeps against the target's own.

A pool of real records (the Python FAQ and HOWTO pages, `bench_evidence.faq_records` / `howto_records`) is
embedded by the target model (SmolLM2-135M-Instruct) and by smaller models; FisherSFT (default parameters: lam 1,
lazy greedy) picks K sentences on each model's features. For every pick set this prints

- overlap: the share of its picks that the target-feature picks also hold;
- the target-feature objective it reaches: log det(I + sum of the picked sentences' X^T X) on the TARGET's
  features, and where that sits between random picks (0%, mean of 5 seeds) and the target-feature greedy (100%);
- the feature extraction cost per 1,000 records: CPU seconds of the forward passes (`time.process_time`, torch on
  one thread, model load excluded), and their wall seconds (on a shared machine wall time measures the other jobs
  too). The benchmark exits non-zero when a smaller model's features cost no less CPU than the target's.

The smaller models: `tiny-gpt2` (the default S2L proxy spec, a randomly initialised 2-layer GPT-2 with its own
BPE: what `embedding.model: proxy` reads with the default `models.proxy`) and SmolLM2 cut to its first L layers
(a local model folder written here: any model spec works), which shares the target's tokenizer.

    SFTCURATE_DOCS_CACHE=.sftcurate/evidence python benchmarks/bench_proxy_features.py --n 120 --k 12,24 \
        --max-length 128 --work /tmp/bpf
"""
from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

TARGET = "builtin:smollm2-135m-instruct"


def pool_pairs(n: int) -> list[tuple[str, str]]:
    """(question or heading, answer or section body) of the first `n` FAQ then HOWTO records."""
    from bench_evidence import doc_sources, faq_records, howto_records

    src = doc_sources(Path(os.environ.get("SFTCURATE_DOCS_CACHE", ".sftcurate/evidence")))
    records = faq_records(src) + howto_records(src)
    if len(records) < n:
        raise SystemExit(f"--n {n}: the FAQ and HOWTO pages hold {len(records)} records")
    return [(r["instruction"], r["output"]) for r in records[:n]]


def truncated_smollm2(layers: int, folder: Path) -> str:
    """A local model folder: SmolLM2-135M-Instruct's first `layers` decoder layers, its final norm and tokenizer."""
    from sftcurate.infra.models import resolve_model

    if not (folder / "config.json").exists():
        loaded = resolve_model(TARGET)
        model = loaded.model
        model.model.layers = model.model.layers[:layers]
        model.config.num_hidden_layers = layers
        model.save_pretrained(folder)
        loaded.tokenizer.save_pretrained(folder)
    return str(folder)


def embed_slice(spec: str, pairs, max_length: int, batch_tokens: int):
    """(features, offsets, CPU seconds and wall seconds of the forward passes, parameters) of `spec` on `pairs`,
    torch on one thread."""
    import torch

    from sftcurate.core.embedding import embed_examples
    from sftcurate.infra.models import resolve_model

    torch.set_num_threads(1)
    loaded = resolve_model(spec)
    params = sum(p.numel() for p in loaded.model.parameters())
    start, wall = time.process_time(), time.perf_counter()
    x, off = next(embed_examples(loaded.model, loaded.tokenizer, pairs, max_length, batch_tokens, "float32", "cpu",
                                 shard_size=len(pairs)))
    return (np.asarray(x), np.asarray(off, dtype=np.int64), time.process_time() - start, time.perf_counter() - wall,
            params)


def features_of(spec: str, n: int, chunk: int, max_length: int, batch_tokens: int, work: Path):
    """`spec`'s features of the first `n` records, embedded `chunk` records per child process (a process that
    runs long on this shared machine loses its CPU share), and the children's summed forward CPU and wall
    seconds."""
    from safetensors.numpy import load_file

    xs, offs, cpu, wall, params = [], [np.zeros(1, np.int64)], 0.0, 0.0, 0
    for lo in range(0, n, chunk):
        name = hashlib.sha256(f"{spec}|{max_length}".encode()).hexdigest()[:12]
        out = work / f"features-{name}-{lo}-{min(n, lo + chunk)}.safetensors"
        if not out.exists():
            subprocess.run([sys.executable, __file__, "--child", spec, "--lo", str(lo), "--hi", str(min(n, lo + chunk)),
                            "--out", str(out), "--max-length", str(max_length), "--batch-tokens", str(batch_tokens)],
                           check=True)
        part = load_file(str(out))
        xs.append(part["features"])
        offs.append(part["offsets"][1:] + offs[-1][-1])
        cpu += float(part["cpu_seconds"][0])
        wall += float(part["wall_seconds"][0])
        params = int(part["parameters"][0])
    return np.concatenate(xs), np.concatenate(offs), cpu, wall, params


def child(spec: str, lo: int, hi: int, out: str, max_length: int, batch_tokens: int) -> None:
    from safetensors.numpy import save_file

    x, off, cpu, wall, params = embed_slice(spec, pool_pairs(hi)[lo:hi], max_length, batch_tokens)
    save_file({"features": x.astype(np.float32), "offsets": off, "cpu_seconds": np.array([cpu]),
               "wall_seconds": np.array([wall]), "parameters": np.array([params], dtype=np.int64)}, out)


def logdet(x: np.ndarray, off: np.ndarray, picks, lam: float = 1.0) -> float:
    """log det(lam I + sum over picked sentences of X^T X), float64."""
    a = lam * np.eye(x.shape[1])
    for i in picks:
        rows = x[off[i]:off[i + 1]].astype(np.float64)
        a += rows.T @ rows
    return float(np.linalg.slogdet(a)[1])


def fishersft_picks(x, off, k: int) -> list[int]:
    from sftcurate.core.fisher_greedy import select_from_features
    from sftcurate.core.selectors.base import Budget

    return select_from_features(x, off, Budget(examples=k), lam=1.0, algorithm="lazy", device="cpu").picks


def run(n: int, ks: list[int], layers: list[int], max_length: int, batch_tokens: int, work: Path,
        chunk: int) -> None:
    models = [("target: SmolLM2-135M (30 layers)", TARGET), ("tiny-gpt2 (default proxy spec)", "tiny-gpt2")]
    models += [(f"SmolLM2, first {L} layers", truncated_smollm2(L, work / f"smollm2-{L}-layers")) for L in layers]
    feats, cpus = {}, {}
    for name, spec in models:
        x, off, cpu, wall, params = features_of(spec, n, chunk, max_length, batch_tokens, work)
        feats[name], cpus[name] = (x, off), cpu
        ratio = "" if name == models[0][0] else f" ({cpus[models[0][0]] / cpu:.1f}x less than the target's)"
        print(f"{name}: {params / 1e6:.1f}M parameters, d={x.shape[1]}, {len(x):,} loss-token rows; per 1,000 "
              f"records {1000 * cpu / n:.1f} CPU s{ratio}, {1000 * wall / n:.1f} wall s", flush=True)
    tx, toff = feats[models[0][0]]
    rng = np.random.default_rng(0)
    print(f"\nN={n} records, max_length={max_length}; objective on the target's features (log det, lam 1)")
    print("| features | K | picks shared with target-feature picks | target objective | between random and "
          "target picks |")
    print("|---|---|---|---|---|")
    for k in ks:
        randoms = [logdet(tx, toff, rng.choice(n, k, replace=False)) for _ in range(5)]
        base = float(np.mean(randoms))
        target_picks = fishersft_picks(tx, toff, k)
        best = logdet(tx, toff, target_picks)
        for name, _ in models:
            picks = target_picks if name == models[0][0] else fishersft_picks(*feats[name], k)
            value = logdet(tx, toff, picks)
            print(f"| {name} | {k} | {len(set(picks) & set(target_picks)) / k:.0%} | {value:.1f} | "
                  f"{(value - base) / (best - base):.0%} |", flush=True)
        print(f"| uniform random (5 seeds) | {k} | - | {base:.1f} (sd {np.std(randoms):.1f}) | 0% |", flush=True)
    dearer = [name for name in cpus if name != models[0][0] and cpus[name] >= cpus[models[0][0]]]
    if dearer:  # the point of a smaller model's features is their cost
        raise SystemExit(f"FAIL: features no cheaper than the target's: {', '.join(dearer)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=240, help="records in the pool")
    ap.add_argument("--k", default="24,48", help="budgets (examples), comma-separated")
    ap.add_argument("--layers", default="6", help="SmolLM2 cut to these many layers, comma-separated")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--chunk", type=int, default=40, help="records embedded per child process")
    ap.add_argument("--work", default=None, help="where the cut models and the features go (default: a temporary "
                    "folder); features already there are reused")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--lo", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--hi", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.lo, args.hi, args.out, args.max_length, args.batch_tokens)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-proxy-features-"))
    work.mkdir(parents=True, exist_ok=True)
    run(args.n, [int(k) for k in args.k.split(",")], [int(v) for v in args.layers.split(",") if v],
        args.max_length, args.batch_tokens, work, args.chunk)


if __name__ == "__main__":
    main()
