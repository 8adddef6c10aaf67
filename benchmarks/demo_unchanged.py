"""Did a refactor change what the product outputs? `make demo`'s three configs at two commits, compared.

    python benchmarks/demo_unchanged.py BEFORE [AFTER]      # AFTER defaults to HEAD; about 7 minutes a commit

Each commit is checked out in a worktree of its own and run as its own package (its `sftcurate/` modules and the
layer folders on PYTHONPATH: the editable install is bypassed), each in a fresh SFTCURATE_HOME, with this
checkout's virtual environment. Compared: every row of each run's `selection.parquet`, its curated records, the
run summaries' values, and the `compare` report's markdown, after content keys, run ids and paths are masked
(code keys change with the code by design). Exits 1 when anything differs, and prints the difference.

`--work DIR` keeps each commit's outputs under DIR/<commit>; a commit whose outputs are there is not run again, so
a chain of commits costs one run each.
"""
from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("core", "infra", "flows", "tasks", "data_contracts")
RUNS = ("demo", "demo-s2l")
NOT_COMPARED = {"examples_uri", "selection_uri", "curated_uri", "mlflow_run_id", "flow_run_id"}


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, check=True, capture_output=True, text=True).stdout.strip()


def run_commit(commit: str, out: Path) -> None:
    """The demo's three configs at `commit`, outputs (JSON summaries, logs, the home) under `out`."""
    tmp = Path(tempfile.mkdtemp(prefix=f"demo-unchanged-{commit}-"))
    tree, package = tmp / "tree", tmp / "pkg" / "sftcurate"
    git("worktree", "add", "--detach", str(tree), commit)
    try:
        package.mkdir(parents=True)
        for module in (tree / "sftcurate").glob("*.py"):
            shutil.copy(module, package)
        for layer in LAYERS:
            (package / layer).symlink_to(tree / layer)
        out.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "SFTCURATE_HOME": str(out / "home"), "PYTHONPATH": str(package.parent)}
        commands = [("run", name, tree / "configs" / f"{name}.yaml") for name in RUNS]
        commands.append(("compare", "compare", tree / "configs" / "demo-compare.yaml"))
        for command, name, config in commands:
            with open(out / f"{name}.log", "w") as log:
                # run from the temporary folder: a checkout's own sftcurate/ in the working folder would shadow
                # the package put together above
                code = subprocess.run([sys.executable, "-c", "from sftcurate.cli import app; app()", command,
                                       str(config), "--json", str(out / f"{name}.json")],
                                      cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
            if code:
                raise SystemExit(f"{commit}: `{command} {config.name}` exited {code}; see {out / f'{name}.log'}")
    finally:
        git("worktree", "remove", "--force", str(tree))
        shutil.rmtree(tmp, ignore_errors=True)


def masked(text: str, side: Path) -> str:
    text = text.replace(str(side), "OUT")
    text = re.sub(r"\b[0-9a-f]{16}\b", "KEY", text)
    text = re.sub(r"\b[0-9a-f]{32}\b", "RUNID", text)
    return re.sub(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", "UUID", text)


def records(uri: str) -> bytes | None:
    path = Path(uri, "records.jsonl")
    return path.read_bytes() if path.exists() else None


def differences(before: Path, after: Path) -> list[str]:
    found = []
    for name in RUNS:
        a, b = (json.loads((side / f"{name}.json").read_text()) for side in (before, after))
        if pq.read_table(a["selection_uri"] + "/selection.parquet").to_pylist() != \
                pq.read_table(b["selection_uri"] + "/selection.parquet").to_pylist():
            found.append(f"{name}: the selection's rows differ")
        if records(a["curated_uri"]) != records(b["curated_uri"]):
            found.append(f"{name}: the curated records differ")
        for key in sorted(set(a) & set(b) - NOT_COMPARED):
            if not isinstance(a[key], (dict, list)) and masked(str(a[key]), before) != masked(str(b[key]), after):
                found.append(f"{name}: summary {key}: {a[key]!r} -> {b[key]!r}")
    a, b = (masked(json.loads((side / "compare.json").read_text())["table_markdown"], side) for side in (before, after))
    if a != b:
        found.append("compare report:\n" + "".join(difflib.unified_diff(a.splitlines(True), b.splitlines(True), n=0)))
    return found


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", help="a commit")
    ap.add_argument("after", nargs="?", default="HEAD", help="a commit (default HEAD)")
    ap.add_argument("--work", default=None, help="keep each commit's outputs here (default: a temporary folder)")
    args = ap.parse_args()
    # absolute: the runs start in a temporary folder, and SFTCURATE_HOME and --json are paths under `work`
    work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="demo-unchanged-"))
    sides = []
    for ref in (args.before, args.after):
        commit = git("rev-parse", "--short=12", f"{ref}^{{commit}}")
        out = work / commit
        if not (out / "compare.json").exists():
            print(f"running the demo at {commit} ...", flush=True)
            shutil.rmtree(out, ignore_errors=True)
            run_commit(commit, out)
        sides.append(out)
    found = differences(*sides)
    print("\n".join(found) if found else "identical: selections, curated records, summaries and the compare report")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
