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

Sentence factors (issue 25, item 2: N=10^6 records of mean 256 loss tokens at d=128, K=10,000). The tokens at
that size are 131 GB, more than this machine's disk, so `--sentence-rank R` writes what `embedding.sentence_rank`
stores instead, generated directly a shard at a time (neither the tokens nor the whole pool are ever in memory):
shards holding `features` (factor rows, float32), `offsets` (into them), `tokens` (each sentence's loss tokens,
int64) and `kept_energy` (float32), with `sftcurate.sentence_rank` in the safetensors metadata and the rank, the
rows stored and the kept energy (min, sum) in the shard's meta, as `core.embedding.embed_shard` writes them, so
`read_stored_features` and `select_from_features` take them as they would real ones; the examples' and the ids'
token counts are the loss tokens, and the child passes them as the sentences' costs, as the selector does.
Sentence i has tokens_i loss tokens, LogNormal with mean `--mean-len` (sigma 0.8, 1 .. 8 x mean: `draw_lengths`
of bench_sentence_rank.py) and min(tokens_i, R) factor rows (R capped at d, as `stored_factors` caps it): row k is
a Gaussian direction shaped by the pool's anisotropy (coordinate j scaled by j^-1/2, as `long_sentences`), scaled
to norm^2 = tokens_i * s_i^2 * (the generator's mean token energy) * k^-1/2 / sum_k k^-1/2, with a per-sentence
scale s_i ~ LogNormal(0, 0.5). So ||F_i||_F^2 is the expected energy of tokens_i generator tokens, spread over a
decaying within-sentence spectrum (steeper than k^-1/2: the anisotropic directions are not orthogonal, they lean
on the pool's strong coordinates). The generated sentence has rank <= R by construction, so its rank-R factor is
exact: kept_energy is 1.0 (a real pool at R < its sentences' rank keeps
less; the store size and the greedy's cost per gain do not depend on it). Printed besides the algorithms' rows:
generation and write times and the bytes of the shard files, and CPU seconds next to the wall ones (on a shared
machine the wall time measures the other jobs).

    python benchmarks/bench_fisher_million.py --sentence-rank 16 --d 128 --k 10000   # the issue's run (R=16)
    python benchmarks/bench_fisher_million.py --sentence-rank 16 --d 128 --n 20000 --k 200   # small (~2 min)
At N=10^6, R=16 the shards hold 15,996,780 factor rows: 8.21 GB of features.safetensors in 16 shards, ~8.23 GB
with the ids (all mapped by each child, and its peak counts the resident pages: ~7.6 GiB of them, so ~8.5-9 GiB
expected in all); at R=32, 31.9 M rows, 16.4 GB, more than the 12 GiB target once the load's finiteness pass has
read every row. Expected cost, from N=5,000..50,000 at K = N/100 on the path N=10^6 takes (no kept Grams, no
trace cache: both exceed their byte limits there; single-thread CPU seconds, which grew linearly in N): writing
the store ~2-3 min CPU (generating ~45 s of it) plus writing 8.2 GB to disk; lazy ~2 min of selection (up to ~5
if it grows faster past 50,000; ~1.1 N evaluations, ~4 N screens), stochastic ~1 min (2.31 M evaluations); each
child's load ~10 s from the page cache (a full read of the 8.2 GB when it is cold).
"""
from __future__ import annotations

import argparse
import hashlib
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


def write_examples(store, n: int, response_tokens, key: str):
    """The examples artifact of n rows; `response_tokens` one count for all (an int) or one per row (an array).
    Returns (its URI, the ids column)."""
    import pyarrow as pa

    from sftcurate.data_contracts import EXAMPLES

    ids = pa.array([f"ex{i}" for i in range(n)])
    const = lambda v: pa.array([v] * n)  # noqa: E731
    table = pa.table({"id": ids, "prompt": const("p"), "response": const("r"), "source": const("s"),
                      "group": const("g"), "turns": const(""), "origin": const("o"),
                      "format": const("prompt_response"), "raw": const("{}"), "prompt_tokens": const(1),
                      "response_tokens": const(response_tokens) if isinstance(response_tokens, int)
                      else pa.array(response_tokens), "split": const("train")})
    w = store.begin("examples", key)
    w.write_table("examples.parquet", table, EXAMPLES)
    w.meta.update({"fingerprint": key, "n_train": n})
    return w.commit(), ids


def write_store(root: str, n: int, L: int, d: int, shard_sentences: int, dist: str = "bench") -> str:
    """An examples artifact, the feature shards and the final (referencing) artifact; returns its URI."""
    import pyarrow as pa

    from bench_fishersft import DISTRIBUTIONS, hidden_like
    from sftcurate.core.embedding import SHARD_KIND, commit_features
    from sftcurate.data_contracts import TOKEN_FEATURES, TOKEN_FEATURES_IDS
    from sftcurate.infra.store import ArtifactStore

    store = ArtifactStore(root)
    examples_uri, ids = write_examples(store, n, L, f"bench-million-{n}")

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


def draw_pool_lengths(n: int, mean_len: int, seed: int = 0) -> np.ndarray:
    """Every sentence's loss tokens (int64, 8 bytes a sentence: the pool's only whole-N array here)."""
    # (its import sets the BLAS thread variables to 1 where unset, as this script's --threads default does)
    from bench_sentence_rank import draw_lengths

    return draw_lengths(n, mean_len, np.random.default_rng(seed))


def factor_shard(lengths: np.ndarray, rank: int, d: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """(factor rows [sum min(tokens_i, rank), d] float32, offsets) of sentences with `lengths` loss tokens: rank
    <= `rank` by construction, so each sentence's rows are its exact factor (see the module docstring)."""
    rows = np.minimum(lengths, rank)
    offsets = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
    owner = np.repeat(np.arange(len(lengths)), rows)
    within = np.arange(int(offsets[-1])) - offsets[:-1][owner]   # row k of its sentence, from 0
    decay = np.arange(1, rank + 1) ** -0.5
    spread = decay[within] / np.cumsum(decay)[rows[owner] - 1]   # the sentence's energy shares, summing to 1
    direction = (np.arange(1, d + 1) ** -0.5).astype(np.float32)  # the pool's anisotropy, as long_sentences'
    scale = rng.lognormal(0.0, 0.5, len(lengths))
    energy = lengths[owner] * scale[owner] ** 2 * float(np.square(direction, dtype=np.float64).sum()) * spread
    x = rng.standard_normal((int(offsets[-1]), d), dtype=np.float32)
    x *= direction                                             # in place: a shard is the largest array held
    x *= np.sqrt(energy / np.einsum("ij,ij->i", x, x, dtype=np.float64)).astype(np.float32)[:, None]
    return x, offsets


def write_factor_store(root: str, lengths: np.ndarray, rank: int, d: int, shard_sentences: int) -> tuple:
    """The examples (their response_tokens the loss tokens), rank-`rank` factor shards written as `embed_shard`
    writes them with `sentence_rank`, and the final artifact; returns (its URI, wall and CPU seconds spent
    generating)."""
    import pyarrow as pa

    from sftcurate.core.embedding import SHARD_KIND, commit_features
    from sftcurate.core.inputs import SENTENCE_RANK
    from sftcurate.data_contracts import TOKEN_FEATURES, TOKEN_FEATURES_IDS
    from sftcurate.infra.store import ArtifactStore

    n, rank = len(lengths), min(rank, d)   # stored_factors caps the rank at d: d rows always suffice
    store = ArtifactStore(root)
    examples_uri, ids = write_examples(store, n, lengths, f"bench-million-r{rank}-{n}")
    shard_uris, generate_s, generate_cpu_s = [], 0.0, 0.0
    for k, lo in enumerate(range(0, n, shard_sentences)):
        m = min(shard_sentences, n - lo)
        tokens = lengths[lo:lo + m]
        t, c = time.perf_counter(), time.process_time()
        x, off = factor_shard(tokens, rank, d, np.random.default_rng([1, k]))
        generate_s, generate_cpu_s = generate_s + time.perf_counter() - t, generate_cpu_s + time.process_time() - c
        factors = {"sentence_rank": rank, "feature_rows": int(off[-1]), "kept_energy_min": 1.0,
                   "kept_energy_sum": float(m)}   # exact factors: every sentence keeps all its energy
        w = store.begin(SHARD_KIND, f"bench-{n}-r{rank}-{k:03d}")
        w.write_tensors("features.safetensors", {"features": x, "offsets": off, "tokens": tokens,
                                                 "kept_energy": np.ones(m, dtype=np.float32)},
                        TOKEN_FEATURES, {SENTENCE_RANK: str(rank)})
        w.write_table("ids.parquet", pa.table({"id": ids.slice(lo, m), "pool_index": np.arange(lo, lo + m),
                                               "n_tokens": tokens}), TOKEN_FEATURES_IDS)
        w.meta.update({"shard_index": k, "shard_size": shard_sentences, "rows": m, "tokens": int(tokens.sum()),
                       "d": d, "model": "synthetic", "projection_uri": None, **factors})
        shard_uris.append(w.commit())
        del x
    return commit_features(examples_uri, shard_uris, root), generate_s, generate_cpu_s


def child(final_uri: str, algorithm: str, k: int, threads: int) -> None:
    """One selection on the memory-mapped shards; prints one JSON line."""
    import torch

    torch.set_num_threads(threads)
    from sftcurate.core.feature_rows import ShardedRows
    from sftcurate.core.fisher_greedy import select_from_features
    from sftcurate.core.inputs import read_stored_features
    from sftcurate.core.selectors.base import Budget

    t, c = time.perf_counter(), time.process_time()
    feats, offsets, ids, tokens, rank = read_stored_features(final_uri)   # read_features_artifact, with tokens
    load_s, load_cpu_s = time.perf_counter() - t, time.process_time() - c

    def mapped(a) -> bool:
        while a is not None and not isinstance(a, mmap.mmap):
            a = getattr(a, "base", None) if not isinstance(a, memoryview) else a.obj
        return isinstance(a, mmap.mmap)

    assert isinstance(feats, ShardedRows) and all(mapped(b) for b in feats.blocks), "features were copied"
    after_load = proc_status()
    t, c = time.perf_counter(), time.process_time()
    # factors: a sentence costs its loss tokens, as the selector passes them (`inputs.token_counts`)
    res = select_from_features(feats, offsets, Budget(examples=k), algorithm=algorithm, seed=0,
                               costs=None if rank is None else tokens)
    select_s, select_cpu_s = time.perf_counter() - t, time.process_time() - c
    st = proc_status()
    factors = {} if rank is None else {
        "sentence_rank": rank, "feature_rows": int(offsets[-1]), "picked_tokens": res.info["tokens"],
        "load_cpu_s": load_cpu_s, "select_cpu_s": select_cpu_s,
        "picks_sha256": hashlib.sha256(json.dumps([int(i) for i in res.picks]).encode()).hexdigest()}
    print(json.dumps({"algorithm": algorithm, "n": len(offsets) - 1, "tokens": int(tokens.sum()),
                      "d": int(feats.shape[1]), "shards": len(feats.blocks), "load_s": load_s,
                      "select_s": select_s, "evaluations": res.info["evaluations"],
                      "screens": res.info.get("screens"), "objective": res.objective, "picks": len(res.picks),
                      "rss_after_load_gib": after_load["VmRSS"], "anon_after_load_gib": after_load["RssAnon"],
                      "peak_gib": st["VmHWM"], "anon_end_gib": st["RssAnon"], "file_end_gib": st["RssFile"],
                      "ru_maxrss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, **factors}),
          flush=True)


def run_algorithms(args, final: str) -> bool:
    """Each algorithm in its own subprocess on the store's final artifact; prints its row. Whether all ran
    within the peak target."""
    ok = True
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
        if "sentence_rank" in row:
            print(f"  rank-{row['sentence_rank']} factors: {row['feature_rows']:,} feature rows for "
                  f"{row['tokens']:,} loss tokens; the {row['picks']:,} picks cost {row['picked_tokens']:,} loss "
                  f"tokens | CPU: load {row['load_cpu_s']:.1f} s, select {row['select_cpu_s']:.1f} s", flush=True)
    return ok


def run_factor_bench(args, root: str) -> int:
    """`--sentence-rank`: the factor store (module docstring), then the algorithms on it."""
    rank = min(args.sentence_rank, args.d)
    if not args.reuse:
        shutil.rmtree(args.dir, ignore_errors=True)
        Path(args.dir).mkdir(parents=True)
        lengths = fit_disk(draw_pool_lengths(args.n, args.mean_len), rank, args.d, args.dir)
        rows = int(np.minimum(lengths, rank).sum())
        print(f"N={len(lengths):,} loss tokens={int(lengths.sum()):,} (mean {lengths.mean():.1f}) sentence_rank={rank} "
              f"d={args.d} K={args.k}: {rows:,} factor rows, {rows * args.d * 4 / 1e9:.2f} GB of float32 "
              f"in shards of {args.shard_sentences:,} sentences under {args.dir}", flush=True)
    ok = True
    try:
        if args.reuse:
            final = (Path(root) / "final_uri.txt").read_text()
        else:
            t, c = time.perf_counter(), time.process_time()
            final, generate_s, generate_cpu_s = write_factor_store(root, lengths, rank, args.d, args.shard_sentences)
            (Path(root) / "final_uri.txt").write_text(str(final))
            print(f"store written in {time.perf_counter() - t:.1f} s wall, {time.process_time() - c:.1f} s CPU "
                  f"(generating the factors: {generate_s:.1f} s wall, {generate_cpu_s:.1f} s CPU)", flush=True)
        ok &= report_store(root, str(final))
        ok &= run_algorithms(args, str(final))
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
            print(f"deleted {args.dir}", flush=True)
    return 0 if ok else 1


def fit_disk(lengths: np.ndarray, rank: int, d: int, where: str) -> np.ndarray:
    """The first sentences whose factor store fits the free disk, leaving 1 GiB and 10% for the other jobs."""
    per_sentence = np.minimum(lengths, rank) * d * 4 + 8 + 8 + 4 + 40   # rows; offset, tokens, kept, ids
    need, free = int(per_sentence.sum()), shutil.disk_usage(where).free
    if need * 1.1 + 2 ** 30 <= free:
        return lengths
    n = int(np.searchsorted(np.cumsum(per_sentence), (free - 2 ** 30) / 1.1))
    print(f"NOTE: {need / 1e9:.1f} GB needed but {free / 1e9:.1f} GB free: N reduced to {n:,}")
    return lengths[:n]


def report_store(root: str, final: str) -> bool:
    """Prints the bytes of the shard files (the store's size) and of the final artifact, which must hold
    references only."""
    files = [p for p in (Path(root) / "token_features_shard").rglob("*") if p.is_file()]
    by_name: dict[str, int] = {}
    for p in files:
        by_name[p.name] = by_name.get(p.name, 0) + p.stat().st_size
    final_bytes = sum(p.stat().st_size for p in Path(final).rglob("*") if p.is_file())
    print(f"store size: {sum(by_name.values()):,} bytes in {len(files)} shard files ("
          + ", ".join(f"{k}: {v:,}" for k, v in sorted(by_name.items())) + f"); final token_features "
          f"artifact: {final_bytes:,} bytes", flush=True)
    return final_bytes < 1 << 20


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
    ap.add_argument("--sentence-rank", type=int, help="store rank-R sentence factors generated directly (above)")
    ap.add_argument("--mean-len", type=int, default=256, help="--sentence-rank: mean loss tokens of a sentence")
    ap.add_argument("--child", nargs=2, metavar=("FINAL_URI", "ALGORITHM"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.sentence_rank is not None and args.sentence_rank < 1:
        ap.error(f"--sentence-rank must be >= 1, got {args.sentence_rank}")
    if args.child:
        child(args.child[0], args.child[1], args.k, args.threads)
        return 0

    root = str(Path(args.dir) / "store")
    if args.sentence_rank is not None:
        return run_factor_bench(args, root)
    need = args.n * args.L * args.d * 4
    n = args.n
    if not args.reuse:
        shutil.rmtree(args.dir, ignore_errors=True)
        Path(args.dir).mkdir(parents=True)
        free = shutil.disk_usage(args.dir).free
        if need * 1.1 + 2 ** 30 > free:  # leave 1 GiB and 10% spare for the other jobs on this disk
            n = int((free - 2 ** 30) / 1.1 / (args.L * args.d * 4))
            print(f"NOTE: {need / 1e9:.1f} GB needed but {free / 1e9:.1f} GB free: N reduced to {n:,}")
    print(f"N={n:,} L={args.L} d={args.d} K={args.k} ({args.dist} features): "
          f"{n * args.L * args.d * 4 / 1e9:.2f} GB of float32 features "
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
        print(f"final token_features artifact: {final_bytes:,} bytes "
              f"({sorted(p.name for p in Path(final).iterdir())}); "
              f"shards: {shard_bytes / 1e9:.2f} GB", flush=True)
        ok &= final_bytes < 1 << 20  # references only, no feature bytes
        ok &= run_algorithms(args, final)
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
            print(f"deleted {args.dir}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
