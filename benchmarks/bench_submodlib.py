"""FisherSFT's lazy greedy side by side with submodlib's LogDeterminant (issue 13, item 4), in one run.

Setting: L=1 (one token per sentence, the only case a sentence-level kernel can express), d=64, features from
`bench_fishersft.hidden_like`, lam=1, K=200 picks, n=5,000 and 10,000.

Convention (checked in the run): our objective is f(S) = log det(lam I_d + X_S^T X_S). submodlib's
LogDeterminantFunction is g(S) = log det(L_SS + lambdaVal I) over a dense n x n kernel L. With L = X X^T / lam and
lambdaVal = 1, Sylvester's identity gives g(S) = log det(I_|S| + X_S X_S^T / lam) = f(S) - d log lam, so both
maximise the same function and their greedy picks agree up to rounding (submodlib's C++ engine is float32).

submodlib is not a dependency of sftcurate: it lives in its own venv (`--subvenv`, default /tmp/subvenv, made
with `--install`: `python3 -m venv` + `pip install numpy submodlib-py`; the registry here has no package named
`submodlib`, and `submodlib-py` is the same project by the same authors, with a manylinux wheel). Each submodlib
run is a subprocess of that venv; features go through a .npy file. Its time is split into building the kernel
(numpy X X^T, then its Python-list conversion that submodlib's binding needs) and `maximize`. When submodlib
cannot be imported, the reason is printed, its rows read "not measured", and a pure-numpy dense-kernel greedy
(Chen et al.'s fast greedy MAP, incremental Cholesky, O(n k) per pick; clearly labelled) stands in.

Largest n: submodlib holds the n x n kernel as float64 numpy, as a list of Python floats (~32 bytes each) and as
C++ floats: its peak grows as c n^2; c is fitted from the measured peaks and the largest n under `--mem-gib`
(default 12 GiB of this 24 GiB machine shared by several workers) is printed, and run once with
`--confirm-largest`. Ours needs O(n L d) features (memory-mapped) and O(n) bookkeeping; its row is a measured
N=1,000,000, L=1 run (and `bench_fisher_million.py` runs N=1,000,000 at L=32).

    python benchmarks/bench_submodlib.py [--install] [--confirm-largest]
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

SUBMODLIB_RUN = r"""
import json, resource, sys, time
import numpy as np
from submodlib import LogDeterminantFunction
X = np.load(sys.argv[1]); lam = float(sys.argv[2]); k = int(sys.argv[3])
t = time.perf_counter()
kernel = (X @ X.T) / lam
f = LogDeterminantFunction(n=X.shape[0], mode="dense", lambdaVal=1.0, sijs=kernel)
kernel_s = time.perf_counter() - t
t = time.perf_counter()
res = f.maximize(budget=k, optimizer="LazyGreedy", stopIfZeroGain=False, stopIfNegativeGain=False,
                 verbose=False, show_progress=False)
maximize_s = time.perf_counter() - t
picks = [int(i) for i, _ in res]
print(json.dumps({"picks": picks, "kernel_s": kernel_s, "maximize_s": maximize_s,
                  "value": float(f.evaluate(set(picks))),
                  "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}))
"""


def install(subvenv: str) -> str | None:
    """Create the separate venv and install submodlib into it; None on success, else the reason."""
    steps = [["python3", "-m", "venv", subvenv],
             [f"{subvenv}/bin/pip", "install", "-q", "numpy", "submodlib-py"]]
    for cmd in steps:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            return f"`{' '.join(cmd)}` did not finish in 300 s"
        if proc.returncode != 0:
            return f"`{' '.join(cmd)}` failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}"
    return None


def submodlib_reason(subvenv: str) -> str | None:
    py = Path(subvenv) / "bin" / "python"
    if not py.exists():
        return f"{py} does not exist (run with --install)"
    proc = subprocess.run([str(py), "-c", "import submodlib, submodlib_cpp"], capture_output=True, text=True)
    if proc.returncode != 0:
        return f"import submodlib failed in {subvenv}: {proc.stderr.strip().splitlines()[-1:]}"
    return None


def run_submodlib(subvenv: str, X: np.ndarray, lam: float, k: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/x.npy"
        np.save(path, X.astype(np.float64))
        t = time.perf_counter()
        proc = subprocess.run([f"{subvenv}/bin/python", "-c", SUBMODLIB_RUN, path, str(lam), str(k)],
                              capture_output=True, text=True)
        wall = time.perf_counter() - t
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-500:]}", "process_s": wall}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_s"] = wall
    return out


def numpy_dense_greedy(X: np.ndarray, lam: float, k: int) -> tuple[list[int], float]:
    """Stand-in when submodlib is missing: greedy on log det(I + L_SS), L = X X^T / lam held dense (n x n),
    by Chen et al.'s fast greedy MAP (the algorithm submodlib implements), in numpy float64."""
    t = time.perf_counter()
    L = (X @ X.T) / lam
    n = L.shape[0]
    d2 = np.diag(L).copy() + 1.0          # marginal det ratio of every item given the picks
    C = np.zeros((k, n))
    picks: list[int] = []
    for j in range(k):
        d2m = np.where(np.isin(np.arange(n), picks), -np.inf, d2)
        i = int(np.argmax(d2m))
        picks.append(i)
        e = (L[i] + (np.arange(n) == i) - C[:j, i] @ C[:j]) / math.sqrt(d2[i])
        C[j] = e
        d2 = d2 - e ** 2
    return picks, time.perf_counter() - t


def ours(X: np.ndarray, lam: float, k: int):
    from sftcurate.core.fisher import LogDetObjective
    from sftcurate.core.fisher_greedy import lazy_greedy

    offsets = np.arange(X.shape[0] + 1, dtype=np.int64)  # L = 1: one row per sentence
    t = time.perf_counter()
    res = lazy_greedy(LogDetObjective(X, offsets, lam), k=k)
    return res, time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ns", default="5000,10000")
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--k", type=int, default=200)
    ap.add_argument("--lam", type=float, default=1.0)
    ap.add_argument("--subvenv", default="/tmp/subvenv")
    ap.add_argument("--install", action="store_true", help="create --subvenv and pip install submodlib-py into it")
    ap.add_argument("--mem-gib", type=float, default=12.0, help="memory cap for the largest-n estimate")
    ap.add_argument("--confirm-largest", action="store_true", help="run submodlib once at the estimated largest n")
    ap.add_argument("--ours-large", type=int, default=1_000_000, help="n of our L=1 large row (0: skip)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    import torch

    from bench_fishersft import hidden_like
    from sftcurate.core.fisher import direct_logdet

    torch.set_num_threads(args.threads)
    reason = install(args.subvenv) if args.install else None
    reason = reason or submodlib_reason(args.subvenv)
    if reason:
        print(f"submodlib: NOT MEASURED: {reason}")
        print("stand-in: pure-numpy dense-kernel fast greedy MAP (labelled 'numpy-dense' below), NOT submodlib")
    else:
        print(f"submodlib: {args.subvenv} (submodlib-py), LogDeterminantFunction dense, optimizer LazyGreedy")
    d, k, lam = args.d, args.k, args.lam
    shift = d * math.log(lam)
    print(f"setting: L=1, d={d}, K={k}, lam={lam}; ours f = log det(lam I + X^T X); "
          f"submodlib g = log det(I + X_S X_S^T / lam) = f - d log lam (= f - {shift:.4f})")
    peaks, ok = [], True
    for n in [int(v) for v in args.ns.split(",")]:
        X, off = hidden_like(n, 1, d, seed=n)
        res, t_ours = ours(X, lam, k)
        if reason:
            picks, t_other = numpy_dense_greedy(X, lam, k)
            label, other = "numpy-dense", {"maximize_s": t_other, "kernel_s": 0.0}
        else:
            other = run_submodlib(args.subvenv, X, lam, k)
            if "error" in other:
                print(f"n={n}: submodlib FAILED: {other['error']}")
                ok = False
                continue
            picks, label = other["picks"], "submodlib"
            peaks.append((n, other["peak_gib"]))
        f_other = direct_logdet(X, off, picks, lam)  # their picks, scored exactly by our objective
        same = sum(a == b for a, b in zip(picks, res.picks))
        total_other = other["kernel_s"] + other["maximize_s"]
        line = (f"n={n:>6}: ours lazy {t_ours:.3f} s | {label} maximize {other['maximize_s']:.3f} s + kernel "
                f"{other['kernel_s']:.3f} s = {total_other:.3f} s | time ratio {label}/ours: maximize "
                f"{other['maximize_s'] / t_ours:.1f}x, with kernel {total_other / t_ours:.1f}x | objective ours "
                f"{res.objective:.6f}, {label}'s picks {f_other:.6f}, difference (ours - theirs) "
                f"{res.objective - f_other:+.2e} | same pick at the same step {same}/{k}")
        if "value" in other:
            line += f" | submodlib's own g + d log lam {other['value'] + shift:.6f}, peak RSS {other['peak_gib']:.2f} GiB"
        print(line, flush=True)
    if peaks:
        c = max(p / n ** 2 for n, p in peaks)  # GiB per n^2: the n x n kernel dominates
        n_max = int(math.sqrt(args.mem_gib / c) // 1000 * 1000)
        print(f"submodlib largest n: peak ~{c * 2 ** 30:.0f} bytes x n^2 (fitted, worst of the runs) -> n <= "
              f"{n_max:,} within {args.mem_gib:.0f} GiB; at n=1,000,000 it would need "
              f"{c * 1e12 / 1024:.0f} TiB")
        if args.confirm_largest:
            X, off = hidden_like(n_max, 1, d, seed=n_max)
            other = run_submodlib(args.subvenv, X, lam, k)
            if "error" in other:
                print(f"submodlib n={n_max:,}: FAILED {other['error']}")
            else:
                print(f"submodlib n={n_max:,}: ran, kernel {other['kernel_s']:.1f} s, maximize "
                      f"{other['maximize_s']:.1f} s, peak RSS {other['peak_gib']:.2f} GiB")
    if args.ours_large:
        from resource import RUSAGE_SELF, getrusage

        X, _ = hidden_like(args.ours_large, 1, d, seed=1)
        res, t_ours = ours(X, lam, k)
        print(f"ours largest run here: n={args.ours_large:,}, L=1, K={k}: lazy {t_ours:.1f} s, "
              f"{res.evaluations:,} evaluations, peak RSS of this process {getrusage(RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f} GiB "
              f"(features {X.nbytes / 2 ** 30:.2f} GiB; bound by the features, memory-mappable, not by n^2)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
