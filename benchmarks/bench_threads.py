"""Two runs side by side: torch threads as every process used to take them (one per core each) against the share
`infra.runners` gives (the cores split among the sftcurate processes running on the machine).

The workload is a forward pass's shape (a 256 x 576 batch through 8 dense layers, SmolLM2's width), long enough
to time. Each scenario runs alone and then as two processes at once; the script prints the seconds of each.

    python benchmarks/bench_threads.py [--steps 300]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time


def work(mode: str, steps: int) -> None:
    import torch

    if mode == "shared":
        from sftcurate.infra.runners import balance_threads, register_process

        register_process()
        time.sleep(1.0)  # the process started beside this one registers too
        balance_threads()
    else:  # what every process did before: as many threads as cores
        torch.set_num_threads(len(os.sched_getaffinity(0)))
        time.sleep(1.0)
    torch.manual_seed(0)
    x = torch.randn(256, 576)
    layers = [torch.randn(576, 576) for _ in range(8)]
    start = time.perf_counter()
    for _ in range(steps):
        h = x
        for w in layers:
            h = torch.tanh(h @ w) * 0.1
    print(f"{mode:>9} threads={torch.get_num_threads()} seconds={time.perf_counter() - start:.1f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--work", choices=["per-core", "shared"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.work:
        work(args.work, args.steps)
        return
    me = [sys.executable, __file__, "--steps", str(args.steps), "--work"]
    print(f"{len(os.sched_getaffinity(0))} cores, load average {os.getloadavg()[0]:.1f}")
    for mode in ("per-core", "shared"):
        print(f"{mode}, alone:")
        subprocess.run([*me, mode], check=True)
        print(f"{mode}, two side by side:")
        both = [subprocess.Popen([*me, mode]) for _ in range(2)]
        if any(p.wait() for p in both):
            sys.exit(1)


if __name__ == "__main__":
    main()
