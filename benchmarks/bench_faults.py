"""Reliability figures: run the fault-injection suite (tests/faults) and print, per category, how many trials ran
and how many passed.

    python benchmarks/bench_faults.py                   # the full suite (SFTCURATE_FAULTS_FULL=1): 24 SIGKILL trials
    python benchmarks/bench_faults.py --only sigkill --workloads s2l --trials 8   # one workload (about 5 min)
    python benchmarks/bench_faults.py --only sigkill --trials 4 --seed 1   # 12 more kills at other moments
    python benchmarks/bench_faults.py --quick           # the subset `make test` runs

Each category is a set of pytest tests (real processes, a real S3 API, MLflow on SQLite, Prefect's engine); a
trial passes when its test passes. An expected failure (xfail: a known issue the test names) counts as not passed.
The exit status is non-zero when any trial failed. `--json FILE` also writes the table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# category -> (test paths, a predicate on the test's name, what it checks)
CATEGORIES = {
    "sigkill": [
        ("SIGKILL of the process group, run (fishersft)", "tests/faults/test_sigkill.py", "[fishersft-"),
        ("SIGKILL of the process group, run (s2l)", "tests/faults/test_sigkill.py", "[s2l-"),
        ("SIGKILL of the process group, compare", "tests/faults/test_sigkill.py", "[compare-"),
        ("SIGKILL aimed between the proxy tokenizer and its first checkpoint", "tests/faults/test_sigkill.py",
         "between_the_proxy_tokenizer"),
    ],
    "storage": [
        ("S3 unreachable or stalled (SIGSTOP/SIGCONT)", "tests/faults/test_storage_outage.py", ""),
        ("S3 stalled mid-run, shorter and longer than the budget", "tests/faults/test_storage_stall.py", ""),
    ],
    "services": [("MLflow / Prefect server unreachable or stalled", "tests/faults/test_service_outage.py", "")],
    "disk": [("disk full mid-artifact", "tests/faults/test_write_failure.py", "")],
    "bad-input": [
        ("bad-input catalogue (one kind each)", "tests/faults/test_bad_input.py", "test_bad_input_is_one_line"),
        ("bad input in a real process", "tests/faults/test_bad_input.py", "in_a_real_process"),
    ],
    "concurrent": [("runs started together in a fresh home", "tests/faults/test_concurrent_runs.py", "")],
    "runs": [("killed and interrupted MLflow runs", "tests/faults/test_killed_runs.py", "")],
    "loading": [("model loading on threads", "tests/faults/test_thread_safe_loading.py", "")],
    "damaged": [("a damaged artifact (altered in place, truncated, deleted; local and S3): rebuilt, or one line",
                 "tests/faults/test_damaged_artifacts.py", "")],
    "export": [("SIGKILL of export before its rename: the previous file whole", "tests/test_export.py",
                "kill_mid_export")],
}


def outcome(case: ET.Element) -> str:
    for child in case:
        if child.tag in ("failure", "error"):
            return "failed"
        if child.tag == "skipped":
            return "xfailed" if "xfail" in (child.get("type", "") + child.get("message", "")) else "skipped"
    return "passed"


def run_pytest(paths: list[str], env: dict, xml: Path) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", *paths],
                   cwd=REPO, env=env, check=False)
    return time.perf_counter() - start


def table(rows: list[dict]) -> str:
    head = f"| {'category':<66} | trials | passed | failed | known issue (xfail) |"
    lines = [head, "|" + "-" * 68 + "|-------:|-------:|-------:|--------------------:|"]
    for r in rows:
        lines.append(f"| {r['category']:<66} | {r['trials']:>6} | {r['passed']:>6} | {r['failed']:>6} "
                     f"| {r['xfailed']:>19} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the default subset (what `make test` runs)")
    parser.add_argument("--only", default="", help=f"comma-separated categories: {', '.join(CATEGORIES)}")
    parser.add_argument("--trials", type=int, default=None, help="SIGKILL trials per workload (full suite: 8)")
    parser.add_argument("--seed", type=int, default=0, help="draws other kill moments (SFTCURATE_SIGKILL_SEED)")
    parser.add_argument("--workloads", default="", help="SIGKILL workloads to run: fishersft, s2l, compare (all)")
    parser.add_argument("--json", default=None, help="also write the rows as JSON")
    args = parser.parse_args()

    chosen = [c.strip() for c in args.only.split(",") if c.strip()] or list(CATEGORIES)
    unknown = set(chosen) - set(CATEGORIES)
    if unknown:
        parser.error(f"unknown categories {sorted(unknown)}; choose from {', '.join(CATEGORIES)}")
    env = {**os.environ, "SFTCURATE_SIGKILL_SEED": str(args.seed)}
    if not args.quick:
        env["SFTCURATE_FAULTS_FULL"] = "1"
    if args.workloads:
        env["SFTCURATE_SIGKILL_WORKLOADS"] = args.workloads
    if args.trials is not None:
        env["SFTCURATE_SIGKILL_TRIALS"] = str(args.trials)
    paths = sorted({path for c in chosen for _, path, _ in CATEGORIES[c]})

    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "faults.xml"
        seconds = run_pytest(paths, env, xml)
        cases = [(c.get("file") or c.get("classname", ""), c.get("name", ""), outcome(c))
                 for c in ET.parse(xml).iter("testcase")] if xml.exists() else []

    rows = []
    for c in chosen:
        for label, path, pick in CATEGORIES[c]:
            module = Path(path).stem
            mine = [o for where, name, o in cases if module in where and pick in name]
            counts = {k: sum(o == k for o in mine) for k in ("passed", "failed", "xfailed", "skipped")}
            rows.append({"category": label, "trials": len(mine) - counts["skipped"], **counts})
    print(f"\nfault suite ({'quick' if args.quick else 'full'}, seed {args.seed}), {seconds:.0f} s on "
          f"{os.cpu_count()} CPUs\n")
    print(table([r for r in rows if r["trials"]]))
    total = {k: sum(r[k] for r in rows) for k in ("trials", "passed", "failed", "xfailed")}
    print(f"\n{total['passed']} of {total['trials']} trials passed"
          + (f", {total['xfailed']} known issues (xfail)" if total["xfailed"] else ""))
    if args.json:
        Path(args.json).write_text(json.dumps({"seconds": seconds, "seed": args.seed, "quick": args.quick,
                                               "rows": rows}, indent=2))
    return 1 if total["failed"] or not cases else 0


if __name__ == "__main__":
    sys.exit(main())
