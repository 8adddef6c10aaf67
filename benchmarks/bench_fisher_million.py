"""FisherSFT at a million sentences (issue 13, item 3): N=1,000,000, L=32, d=64 float32 (8 GB), K=1,000.

The features go through the real store path: an "examples" artifact of N rows, N/S "token_features_shard"
artifacts (one safetensors file each, written by the store's writer) and the final "token_features" artifact
made by `core.embedding.commit_features`, which only references the shards. Each algorithm (lazy, stochastic)
then runs in its own subprocess, so peak memories do not mix: `core.inputs.read_features_artifact` memory-maps
the shard files (no copy) and `select_from_features` runs the greedy on them. Printed per algorithm: load time
(includes the contract's finiteness pass over all 8 GB), selection time, peak resident memory (VmHWM, which
counts the file-backed pages of the mapped shards that are resident, as well as anonymous memory) and the
anonymous part at the end (RssAnon). Target: peak <= 12 GiB. The shard files are deleted at the end unless
`--keep`.

    python benchmarks/bench_fisher_million.py                    # the full run
    python benchmarks/bench_fisher_million.py --n 20000 --k 50   # a small check of the same path (~1 min)
Exit status 1 when a run fails or its peak exceeds the target.
"""
from __future__ import annotations

import argparse
import json
import mmap
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

PEAK_TARGET_GIB = 12.0


def proc_status() -> dict[str, float]:
    """VmHWM (peak resident), VmRSS, RssAnon, RssFile of this process, in GiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = int(rest.split()[0]) / 2 ** 20
    return out


def write_store(root: str, n: int, L: int, d: int, shard_sentences: int, dist: str = "bench") -> str:
    """An examples artifact, the feature shards and the final (referencing) artifact; returns its URI."""
    import pyarrow as pa

    from bench_fishersft import DISTRIBUTIONS, hidden_like
    from sftcurate.core.embedding import SHARD_KIND, commit_features
    from sftcurate.data_contracts import EXAMPLES, TOKEN_FEATURES, TOKEN_FEATURES_IDS
    from sftcurate.infra.store import ArtifactStore

    store = ArtifactStore(root)
    ids = pa.array([f"ex{i}" for i in range(n)])
    const = lambda v: pa.array([v] * n)  # noqa: E731
    table = pa.table({"id": ids, "prompt": const("p"), "response": const("r"), "source": const("s"),
                      "group": const("g"), "turns": const(""), "origin": const("o"),
                      "format": const("prompt_response"), "raw": const("{}"), "prompt_tokens": const(1),
                      "response_tokens": const(L), "split": const("train")})
    w = store.begin("examples", f"bench-million-{n}")
    w.write_table("examples.parquet", table, EXAMPLES)
    w.meta.update({"fingerprint": f"bench-million-{n}", "n_train": n})
    examples_uri = w.commit()
    del table

    shard_uris = []
    for k, lo in enumerate(range(0, n, shard_sentences)):
        m = min(shard_sentences, n - lo)
        x, off = hidden_like(m, L, d, seed=k, **DISTRIBUTIONS[dist])
        w = store.begin(SHARD_KIND, f"bench-{n}-{k:03d}")
        w.write_tensors("features.safetensors", {"features": x, "offsets": off}, TOKEN_FEATURES)
        w.write_table("ids.parquet", pa.table({"id": ids.slice(lo, m), "pool_index": np.arange(lo, lo + m),
                                               "n_tokens": np.diff(off)}), TOKEN_FEATURES_IDS)
        w.meta.update({"shard_index": k, "shard_size": shard_sentences, "rows": m, "tokens": int(off[-1]),
                       "d": d, "model": "synthetic", "projection_uri": None})
        shard_uris.append(w.commit())
        del x
    return commit_features(examples_uri, shard_uris, root)


def child(final_uri: str, algorithm: str, k: int, threads: int) -> None:
    """One selection on the memory-mapped shards; prints one JSON line."""
    import torch

    torch.set_num_threads(threads)
    from sftcurate.core.feature_rows import ShardedRows
    from sftcurate.core.fisher_greedy import select_from_features
    from sftcurate.core.inputs import read_features_artifact
    from sftcurate.core.selectors.base import Budget

    t = time.perf_counter()
    feats, offsets, ids = read_features_artifact(final_uri)
    load_s = time.perf_counter() - t

    def mapped(a) -> bool:
        while a is not None and not isinstance(a, mmap.mmap):
            a = getattr(a, "base", None) if not isinstance(a, memoryview) else a.obj
        return isinstance(a, mmap.mmap)

    assert isinstance(feats, ShardedRows) and all(mapped(b) for b in feats.blocks), "features were copied"
    after_load = proc_status()
    t = time.perf_counter()
    res = select_from_features(feats, offsets, Budget(examples=k), algorithm=algorithm, seed=0)
    select_s = time.perf_counter() - t
    st = proc_status()
    print(json.dumps({"algorithm": algorithm, "n": len(offsets) - 1, "tokens": int(offsets[-1]),
                      "d": int(feats.shape[1]), "shards": len(feats.blocks), "load_s": load_s,
                      "select_s": select_s, "evaluations": res.info["evaluations"],
                      "screens": res.info.get("screens"), "objective": res.objective, "picks": len(res.picks),
                      "rss_after_load_gib": after_load["VmRSS"], "anon_after_load_gib": after_load["RssAnon"],
                      "peak_gib": st["VmHWM"], "anon_end_gib": st["RssAnon"], "file_end_gib": st["RssFile"],
                      "ru_maxrss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--L", type=int, default=32)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--shard-sentences", type=int, default=62_500, help="sentences per shard (512 MB at L=32, d=64)")
    ap.add_argument("--dist", default="bench", choices=("bench", "near-isotropic"),
                    help="feature generator of bench_fishersft (near-isotropic: the lazy worst case)")
    ap.add_argument("--algorithms", default="lazy,stochastic", help="comma list; empty: only write the store")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the 2-core machine is shared)")
    ap.add_argument("--dir", default="/tmp/sftcurate-bench-million", help="store root for the shards (deleted)")
    ap.add_argument("--keep", action="store_true", help="keep the store (then --reuse runs on it again)")
    ap.add_argument("--reuse", action="store_true", help="use the store left by --keep instead of writing it")
    ap.add_argument("--child", nargs=2, metavar=("FINAL_URI", "ALGORITHM"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child[0], args.child[1], args.k, args.threads)
        return 0

    root = str(Path(args.dir) / "store")
    need = args.n * args.L * args.d * 4
    n = args.n
    if not args.reuse:
        shutil.rmtree(args.dir, ignore_errors=True)
        Path(args.dir).mkdir(parents=True)
        free = shutil.disk_usage(args.dir).free
        if need * 1.1 + 2 ** 30 > free:  # leave 1 GiB and 10% spare for the other jobs on this disk
            n = int((free - 2 ** 30) / 1.1 / (args.L * args.d * 4))
            print(f"NOTE: {need / 1e9:.1f} GB needed but {free / 1e9:.1f} GB free: N reduced to {n:,}")
    print(f"N={n:,} L={args.L} d={args.d} K={args.k} ({args.dist} features): {n * args.L * args.d * 4 / 1e9:.2f} GB of float32 features "
          f"in shards of {args.shard_sentences:,} sentences under {args.dir}", flush=True)
    ok = True
    try:
        t = time.perf_counter()
        if args.reuse:
            final = (Path(root) / "final_uri.txt").read_text()
        else:
            final = str(write_store(root, n, args.L, args.d, args.shard_sentences, args.dist))
            (Path(root) / "final_uri.txt").write_text(final)
            print(f"store written in {time.perf_counter() - t:.0f} s", flush=True)
        final_bytes = sum(p.stat().st_size for p in Path(final).rglob("*") if p.is_file())
        shard_bytes = sum(p.stat().st_size for p in (Path(root) / "token_features_shard").rglob("*") if p.is_file())
        print(f"final token_features artifact: {final_bytes:,} bytes ({sorted(p.name for p in Path(final).iterdir())}); "
              f"shards: {shard_bytes / 1e9:.2f} GB", flush=True)
        ok &= final_bytes < 1 << 20  # references only, no feature bytes
        for algo in [a for a in args.algorithms.split(",") if a]:
            cmd = [sys.executable, __file__, "--child", final, algo, "--k", str(args.k), "--threads", str(args.threads)]
            t = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            wall = time.perf_counter() - t
            if proc.returncode != 0:
                print(f"{algo}: FAILED (exit {proc.returncode}, {wall:.0f} s)\n{proc.stderr[-3000:]}", flush=True)
                ok = False
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            within = row["peak_gib"] <= PEAK_TARGET_GIB
            ok &= within
            print(f"{algo}: N={row['n']:,} tokens={row['tokens']:,} shards={row['shards']} | load {row['load_s']:.1f} s, "
                  f"select {row['select_s']:.1f} s (process {wall:.0f} s) | evaluations {row['evaluations']:,}, "
                  f"screens {row['screens']} | objective {row['objective']:.4f} | peak RSS {row['peak_gib']:.2f} GiB "
                  f"(target <= {PEAK_TARGET_GIB:.0f}: {'yes' if within else 'NO'}), anonymous at end "
                  f"{row['anon_end_gib']:.2f} GiB, mapped-file resident at end {row['file_end_gib']:.2f} GiB, "
                  f"after load RSS {row['rss_after_load_gib']:.2f} GiB (anon {row['anon_after_load_gib']:.2f})",
                  flush=True)
            print("  " + json.dumps(row), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
            print(f"deleted {args.dir}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
