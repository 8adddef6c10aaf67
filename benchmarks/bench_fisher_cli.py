"""Issue 25's bar through the CLI: `sftcurate select fishersft --algorithm lazy` on N=100,000 sentences of L=32
tokens at d=64, K=1,000, the whole call timed (start-up, reading and checking the features, the greedy, writing
the manifest) and a K=1 call on the same file for the part that is not the greedy.

Cases (features written as `.safetensors` with `features` and `offsets`, one at a time, deleted after):
- `random-scales`: the issue's case, standard normal tokens, each dimension scaled by U[0, 2) (the benchmark's
  generator, `bench_fishersft.random_scales`).
- `rotated-laplace`: Laplace tokens, per-dimension scales U[0, 2) in a random orthonormal basis, so A^-1 is far
  from diagonal in the stored basis. Kept apart from the benchmark until its first CLI run (2026-12-05: 86 s),
  which showed the float16 trace screen's error bound useless there; the screen has run in the pool's principal
  axes since, so this case is no longer apart: it is in `bench_fishersft.GENERATORS` too.
- `mixed-t`: kept apart (defined before its first run, never used to develop or tune): Student's t tokens
  (df 5) plus a per-sentence topic N(0, 0.25 I), mixed by a random Gaussian matrix G / sqrt(d) (not
  orthogonal: correlated dimensions and a few weak directions).

    python benchmarks/bench_fisher_cli.py                   # all three, ~5 min with writing the files
    python benchmarks/bench_fisher_cli.py --cases mixed-t   # one

Exit status 1 when a whole K=1,000 call takes more than `--target` seconds (30).
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_fishersft import random_scales, rotated_laplace  # noqa: E402

SFTCURATE = Path(sys.executable).with_name("sftcurate")


def mixed_t(n: int, L: int, d: int, seed: int = 11):
    rng = np.random.default_rng(seed)
    mix = (rng.standard_normal((d, d)) / np.sqrt(d)).astype(np.float32)
    x = np.empty((n * L, d), dtype=np.float32)
    per = 1 << 15  # sentences a slice
    for lo in range(0, n, per):
        m = min(per, n - lo)
        z = rng.standard_t(5.0, (m, L, d)).astype(np.float32)
        z += 0.5 * rng.standard_normal((m, 1, d)).astype(np.float32)
        x[lo * L:(lo + m) * L] = z.reshape(-1, d) @ mix
    return x, np.arange(n + 1, dtype=np.int64) * L


CASES = {"random-scales": random_scales, "rotated-laplace": rotated_laplace, "mixed-t": mixed_t}


def timed_select(features: Path, k: int, out: Path) -> tuple[float, float, str]:
    """(wall s, CPU s of the child, the printed objective line) of one `sftcurate select fishersft` call."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([str(SFTCURATE), "select", "fishersft", "--features", str(features), "--budget", str(k),
                           "--algorithm", "lazy", "--out", str(out)], capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"sftcurate select failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    objective = next((line.split()[-1] for line in done.stdout.splitlines() if "objective" in line), "?")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, objective


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--target", type=float, default=30.0)
    args = ap.parse_args(argv)
    names = args.cases.split(",")
    unknown = sorted(set(names) - set(CASES))
    if unknown:
        ap.error(f"unknown cases {unknown}; choose from {sorted(CASES)}")
    print(f"| case | N | K | whole call, K={args.k} | CPU | K=1 call (start-up, reading, first pass) | objective "
          f"| <= {args.target:g} s |")
    print("|---|---|---|---|---|---|---|---|")
    missed = 0
    with tempfile.TemporaryDirectory(prefix="sftcurate-cli-bar-") as tmp:
        for name in names:
            x, off = CASES[name](args.n, 32, 64)
            path = Path(tmp) / f"{name}.safetensors"
            save_file({"features": x, "offsets": off}, str(path))
            del x, off
            wall, cpu, objective = timed_select(path, args.k, Path(tmp) / f"{name}-selection.parquet")
            base, _, _ = timed_select(path, 1, Path(tmp) / f"{name}-one.parquet")
            ok = wall <= args.target
            missed += not ok
            print(f"| {name} | {args.n:,} | {args.k:,} | {wall:.1f} s | {cpu:.1f} s | {base:.1f} s | {objective} "
                  f"| {'yes' if ok else 'MISSED'} |", flush=True)
            path.unlink()
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
