"""Rank-r sentence factors (issue 25, item 2): the greedy on r rows per sentence against the greedy on the tokens.

A sentence's tokens X_i enter FisherSFT's log det only through X_i^T X_i, so `core.fisher_features.sentence_factors`
keeps r rows F_i with F_i^T F_i = the rank-r part of X_i^T X_i (`embedding.sentence_rank`). This script measures
what that costs: the lazy greedy runs on the tokens (exact) and on the factors for each r, to K = the largest of
`--ks`; the first K picks of one run are what a run to K picks (a sentence-count greedy is a prefix), so every K
is read off one run. Each selection is scored by the exact log det of its picks ON THE TOKENS (float64), as a
share of the token greedy's (objective kept), with the share of picks both selections hold.

Generators:
- `synthetic` (`long_sentences`): the benchmark generator's tokens (per-sentence scale LogNormal(0, 0.5) and
  topic mean N(0, 0.25 I), spectrum k^-1/2) in sentences of LogNormal lengths (sigma 0.8, mean `--mean-len`,
  1 .. 8 x mean), d = 64.
- `smollm2` (`--real N`): SmolLM2-135M-Instruct's pre-logit states (`builtin:smollm2-135m-instruct`, CPU, fp32)
  of N sections of Python's own documentation (`bench_evidence.doc_sources`: every .rst page cut into titled
  sections, the prompt the page and title, the response the section text cut at 1,500 characters), projected
  to d = 64 by the seeded random projection `embedding.d_proj` uses (the exact greedy at d = 576 and ~250 tokens
  per sentence would take hours here). With `--real-mean-len M` the records are not sections but consecutive
  pieces of a text stream of LogNormal token lengths drawn as `long_sentences` draws them (mean M, sigma 0.8,
  1 .. 8 x M): the Python documentation page by page, then the docstrings of the installed numpy and pandas
  module by module (`text_streams`), so N = 10,000 real records of mean 256 exist (the docs alone hold 2.33 M
  tokens).

`--store` prints the store size of the token features and of the factors for `--store-n` records of mean
`--mean-len` tokens at d = `--store-d`, from the format (float32 rows, int64 offsets, per-sentence tokens int64
and kept energy float32), the lengths drawn as `long_sentences` draws them.

    python benchmarks/bench_sentence_rank.py                        # synthetic, N=10,000, K=100..500
    python benchmarks/bench_sentence_rank.py --n 2000 --ks 50       # the earlier reduced size
    python benchmarks/bench_sentence_rank.py --real 1000 --skip-synthetic   # real SmolLM2 features
    python benchmarks/bench_sentence_rank.py --real 4000 --skip-synthetic   # all 3,617 sections (~40 min)
    python benchmarks/bench_sentence_rank.py --real 10000 --real-mean-len 256 --skip-synthetic \
        --save-real .sftcurate/evidence/smollm2-pieces-256.safetensors       # N=10,000 real, mean 256 (~75 min)
    python benchmarks/bench_sentence_rank.py --store --skip-synthetic       # sizes at N=10^6, d=128
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

for _var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS"):  # one BLAS thread, as torch's
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402  (after the thread settings)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIGMA = 0.8


def draw_lengths(n: int, mean_len: int, rng, sigma: float = SIGMA) -> np.ndarray:
    return np.clip(np.rint(rng.lognormal(np.log(mean_len) - sigma ** 2 / 2, sigma, n)), 1,
                   8 * mean_len).astype(np.int64)


def long_sentences(n: int, mean_len: int, d: int, seed: int = 0):
    """The benchmark generator's tokens (per-sentence scale and topic, anisotropic spectrum) in sentences of
    LogNormal lengths with mean `mean_len` (1 .. 8 x mean): real SFT responses, not L=32."""
    rng = np.random.default_rng(seed)
    lengths = draw_lengths(n, mean_len, rng)
    spec = (np.arange(1, d + 1) ** -0.5).astype(np.float32)
    scale = rng.lognormal(0, 0.5, n).astype(np.float32)
    topic = rng.standard_normal((n, d), dtype=np.float32) * 0.5
    x = rng.standard_normal((int(lengths.sum()), d), dtype=np.float32)
    owner = np.repeat(np.arange(n), lengths)
    x = (x + topic[owner]) * spec * scale[owner, None]
    return x, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def prefix_objectives(x, off, picks, ks, lam: float) -> dict[int, float]:
    """log det(lam I + sum of the first K picks' X_i^T X_i) - d log lam on the tokens, float64, for every K."""
    d = x.shape[1]
    A = lam * np.eye(d)
    out, ks = {}, sorted(ks)
    for n, i in enumerate(picks, 1):
        Xi = np.asarray(x[off[i]:off[i + 1]], dtype=np.float64)
        A += Xi.T @ Xi
        if n in ks:
            out[n] = float(np.linalg.slogdet(A)[1]) - d * np.log(lam)
    return out


def compare_ranks(x, off, ks, ranks=(8, 16, 32), lam: float = 1.0) -> list[dict]:
    """One row per (representation, K): objective kept on the tokens, picks shared with the token greedy, rows
    stored, kept energy, CPU seconds of the factors and of the greedy."""
    from sftcurate.core.fisher import LogDetObjective
    from sftcurate.core.fisher_features import sentence_factors
    from sftcurate.core.fisher_greedy import lazy_greedy

    k = max(ks)
    t = time.process_time()
    exact = lazy_greedy(LogDetObjective(x, off, lam), k=k)
    exact_s = time.process_time() - t
    f_exact = prefix_objectives(x, off, exact.picks, ks, lam)
    rows = [{"rank": "tokens", "k": kk, "objective": 1.0, "overlap": 1.0, "rows": len(x), "kept_min": 1.0,
             "kept_mean": 1.0, "factor_s": 0.0, "select_s": exact_s, "value": f_exact[kk]} for kk in ks]
    for r in ranks:
        t = time.process_time()
        fx, foff, kept = sentence_factors(x, off, r)
        factor_s = time.process_time() - t
        t = time.process_time()
        res = lazy_greedy(LogDetObjective(fx, foff, lam), k=k)
        select_s = time.process_time() - t
        f = prefix_objectives(x, off, res.picks, ks, lam)
        for kk in ks:
            rows.append({"rank": r, "k": kk, "objective": f[kk] / f_exact[kk], "value": f[kk],
                         "overlap": len(set(res.picks[:kk]) & set(exact.picks[:kk])) / kk, "rows": len(fx),
                         "kept_min": float(kept.min()), "kept_mean": float(kept.mean()), "factor_s": factor_s,
                         "select_s": select_s})
        del fx, foff
    return rows


def print_rows(rows: list[dict]) -> None:
    print("| representation | K | rows stored | kept energy min / mean | objective kept | picks shared |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['rank']} | {r['k']} | {r['rows']:,} | {r['kept_min']:.3f} / {r['kept_mean']:.3f} | "
              f"{100 * r['objective']:.3f}% ({r['value']:.2f}) | {100 * r['overlap']:.0f}% |", flush=True)
    seen = {}
    for r in rows:
        seen.setdefault(r["rank"], (r["factor_s"], r["select_s"]))
    print("CPU s (loaded machine, not a timing claim): " + ", ".join(
        f"{k}: factors {a:.0f} + greedy {b:.0f}" for k, (a, b) in seen.items()), flush=True)


def doc_records(n: int, max_chars: int = 1500) -> list[tuple[str, str]]:
    """(prompt, response) of up to `n` titled sections of Python's documentation, in file order."""
    from bench_evidence import doc_sources, sections

    src = doc_sources(Path(os.environ.get("SFTCURATE_DOCS_CACHE", ".sftcurate/evidence")))
    out = []
    for page in sorted(src.rglob("*.rst.txt")):
        for title, body in sections(page):
            if len(body) >= 300:
                out.append((f"{page.stem.split('.')[0]}: {title}", body[:max_chars]))
                if len(out) >= n:
                    return out
    return out


def text_streams():
    """(source, [(title, text), ...]) in a fixed order: every page of Python's documentation (its titled
    sections), then every module of the installed numpy and pandas (its docstrings of at least 300 characters,
    read with `ast`, nothing imported or run). The pinned versions make the stream the same on every machine."""
    import ast

    import numpy
    import pandas
    from bench_evidence import doc_sources, sections

    src = doc_sources(Path(os.environ.get("SFTCURATE_DOCS_CACHE", ".sftcurate/evidence")))
    for page in sorted(src.rglob("*.rst.txt")):
        yield page.stem.split(".")[0], [(t, b) for t, b in sections(page) if b]
    for package in (numpy, pandas):
        root = Path(package.__file__).parent
        for module in sorted(root.rglob("*.py")):
            if "tests" in module.relative_to(root).parts:
                continue
            try:
                tree = ast.parse(module.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError):
                continue
            docs = [(getattr(node, "name", module.stem), ast.get_docstring(node) or "") for node in ast.walk(tree)
                    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
            yield f"{package.__name__}/{module.relative_to(root)}", [(t, d) for t, d in docs if len(d) >= 300]


def piece_records(n: int, mean_len: int, tokenizer, seed: int = 0) -> list[tuple[str, str]]:
    """(prompt, response) of `n` consecutive pieces of `text_streams`, each response `draw_lengths` tokens long
    (LogNormal, sigma 0.8, the mean `mean_len`, as `long_sentences` draws them): a source's text is cut in order,
    and a source's tail shorter than the next draw is dropped, so every piece has its drawn length (up to the
    re-tokenisation of the piece's text). The prompt names the source and the section the piece starts in."""
    import bisect

    lengths = draw_lengths(n, mean_len, np.random.default_rng(seed))
    out: list[tuple[str, str]] = []
    for source, segments in text_streams():
        starts, parts, at = [], [], 0
        for title, text in segments:
            starts.append(at)
            parts.append(text)
            at += len(text) + 2
        text = "\n\n".join(parts)
        spans = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        a = 0
        while len(out) < n and a + lengths[len(out)] <= len(spans):
            b = a + int(lengths[len(out)])
            title = segments[bisect.bisect_right(starts, spans[a][0]) - 1][0]
            out.append((f"{source}: {title}", text[spans[a][0]:spans[b - 1][1]]))
            a = b
        if len(out) >= n:
            return out
    return out


def real_features(n: int, d_proj: int = 64, batch_tokens: int = 4096, threads: int | None = None,
                  mean_len: int = 0):
    """SmolLM2-135M's token features of `n` documentation sections (`doc_records`), or with `mean_len` of `n`
    LogNormal-length pieces (`piece_records`), randomly projected to `d_proj`, embedded on `threads` torch
    threads (default: every core; the greedies after run on one)."""
    import torch

    from sftcurate.core.embedding import embed_examples, random_projection
    from sftcurate.infra.models import resolve_model

    loaded = resolve_model("builtin:smollm2-135m-instruct")
    pairs = piece_records(n, mean_len, loaded.tokenizer) if mean_len else doc_records(n)
    max_length = 8 * mean_len + 128 if mean_len else 1024
    proj = random_projection(int(loaded.model.config.hidden_size), d_proj)
    t = time.time()
    before = torch.get_num_threads()
    torch.set_num_threads(threads or os.cpu_count() or 1)
    try:
        x, off = next(embed_examples(loaded.model, loaded.tokenizer, pairs, max_length, batch_tokens, "float32", "cpu",
                                     shard_size=len(pairs), projection=proj))
    finally:
        torch.set_num_threads(before)
    print(f"embedded {len(pairs)} records, {len(x):,} loss tokens (mean {np.diff(off).mean():.0f}, median "
          f"{np.median(np.diff(off)):.0f}) in {time.time() - t:.0f} s wall", flush=True)
    return x, off


def store_sizes(n: int, mean_len: int, d: int, ranks=(8, 16, 32), seed: int = 0) -> list[tuple]:
    """(representation, feature rows, bytes) of a store of `n` records: float32 rows, int64 offsets [n+1]; the
    factors also keep each sentence's tokens (int64) and kept energy (float32)."""
    lengths = draw_lengths(n, mean_len, np.random.default_rng(seed))
    out = [("tokens", int(lengths.sum()), int(lengths.sum()) * d * 4 + (n + 1) * 8)]
    for r in ranks:
        rows = int(np.minimum(lengths, min(r, d)).sum())
        out.append((f"r = {r}", rows, rows * d * 4 + (n + 1) * 8 + n * (8 + 4)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10000, help="synthetic sentences")
    ap.add_argument("--mean-len", type=int, default=256)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--ks", default="100,200,300,400,500")
    ap.add_argument("--ranks", default="8,16,32")
    ap.add_argument("--skip-synthetic", action="store_true")
    ap.add_argument("--real", type=int, default=0, help="also real SmolLM2 features of this many doc sections")
    ap.add_argument("--real-mean-len", type=int, default=0,
                    help="real records are LogNormal-length pieces of this mean (tokens) of the docs, numpy and "
                         "pandas docstrings, not the sections cut at 1,500 characters")
    ap.add_argument("--save-real", default="", help="write the real features here (.safetensors)")
    ap.add_argument("--load-real", default="", help="read real features saved by --save-real instead of embedding")
    ap.add_argument("--store", action="store_true", help="store sizes from the format")
    ap.add_argument("--store-n", type=int, default=1_000_000)
    ap.add_argument("--store-d", type=int, default=128)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    ks = [int(v) for v in args.ks.split(",")]
    ranks = tuple(int(v) for v in args.ranks.split(","))
    if not args.skip_synthetic:
        x, off = long_sentences(args.n, args.mean_len, args.d)
        print(f"\nsynthetic (long_sentences): N={args.n:,}, {len(x):,} tokens (mean {np.diff(off).mean():.1f}), "
              f"d={args.d}, lam=1, lazy greedy", flush=True)
        print_rows(compare_ranks(x, off, ks, ranks))
        del x, off
    if args.real:
        if args.load_real:
            from safetensors.numpy import load_file

            saved = load_file(args.load_real)
            x, off = saved["features"], saved["offsets"]
        else:
            x, off = real_features(args.real, mean_len=args.real_mean_len)
        if args.save_real:  # for bench_fishersft.py --real-features (its old-vs-new row on real features)
            from safetensors.numpy import save_file

            Path(args.save_real).parent.mkdir(parents=True, exist_ok=True)
            save_file({"features": x, "offsets": off}, args.save_real)
        ks_real = [k for k in ks if k <= len(off) // 4] or [max(1, (len(off) - 1) // 10)]
        kind = f"LogNormal pieces, mean {args.real_mean_len}" if args.real_mean_len else "doc sections"
        print(f"\nsmollm2 ({kind}): N={len(off) - 1:,}, {len(x):,} tokens (mean {np.diff(off).mean():.1f}, median "
              f"{np.median(np.diff(off)):.0f}), d={x.shape[1]} (random projection "
              f"of 576), lam=1, lazy greedy", flush=True)
        print_rows(compare_ranks(x, off, ks_real, ranks))
    if args.store:
        print(f"\nstore for N={args.store_n:,} records, mean {args.mean_len} tokens (long_sentences' lengths), "
              f"d={args.store_d}, float32:")
        print("| representation | feature rows | bytes | vs tokens |")
        print("|---|---|---|---|")
        sizes = store_sizes(args.store_n, args.mean_len, args.store_d, ranks)
        for name, rows, size in sizes:
            print(f"| {name} | {rows:,} | {size / 1e9:.2f} GB | {size / sizes[0][2]:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
