"""Issue 11, fault 6: the S3 server (moto) stalled with SIGSTOP/SIGCONT in the middle of a real `sftcurate run`.

The stall starts when the run's first object lands in the bucket (so it always hits a run that is writing) and
lasts either less than the retry budget (the run waits and finishes, every committed artifact whole) or more (the
run stops with one line and exit status 1 within the budget, and nothing half-written looks committed).
`test_storage_outage.py` covers the store's retry loop itself; this is the whole command against a stalled host.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.conftest import free_port, wait_http
from tests.faults.full import full_only, when_full
from tests.faults.test_storage_outage import make_bucket, start_moto
from tests.helpers import stop

pytestmark = [pytest.mark.faults, pytest.mark.usefixtures("prefect_harness")]

CONFIG = """name: s3-stall
source: {uri: 'builtin:python-docs', limit: 60}
selection: {method: uniform, budget: 5}
models: {target: tiny-gpt2, max_length: 64}
"""
CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}


@pytest.fixture
def moto(monkeypatch):
    for key, value in CREDS.items():
        monkeypatch.setenv(key, value)
    port = free_port()
    proc = start_moto(port)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_http(endpoint, timeout=60)
        yield proc, endpoint
    finally:
        stop(proc)


def s3_client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                        aws_secret_access_key="testing")


def stall_on_first_write(proc: subprocess.Popen, endpoint: str, bucket: str, seconds: float | None,
                         run: subprocess.Popen) -> dict:
    """In a thread: wait for the run's first object, SIGSTOP moto, SIGCONT it after `seconds` (None: once the
    run has exited). Returns what happened (filled in as it happens)."""
    state: dict = {}
    client = s3_client(endpoint)

    def watch() -> None:
        while run.poll() is None:
            if client.list_objects_v2(Bucket=bucket).get("KeyCount", 0):
                proc.send_signal(signal.SIGSTOP)
                state["stopped_at"] = time.perf_counter()
                break
            time.sleep(0.05)
        else:
            return
        deadline = None if seconds is None else state["stopped_at"] + seconds
        while run.poll() is None and (deadline is None or time.perf_counter() < deadline):
            time.sleep(0.05)
        proc.send_signal(signal.SIGCONT)
        state["stalled_for"] = time.perf_counter() - state["stopped_at"]

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    state["thread"] = thread
    return state


def start_run(tmp_path, endpoint: str, bucket: str, budget: float) -> subprocess.Popen:
    from prefect.settings import PREFECT_API_URL

    config = tmp_path / "stall.yaml"
    config.write_text(CONFIG)
    env = {**os.environ, **CREDS, "SFTCURATE_STORE": f"s3://{bucket}/store", "SFTCURATE_S3_ENDPOINT_URL": endpoint,
           "SFTCURATE_STORAGE_RETRY_SECONDS": str(budget), "PREFECT_API_URL": PREFECT_API_URL.value() or "",
           "COLUMNS": "200"}
    return subprocess.Popen([sys.executable, "-c", DUMPABLE_CLI, "run", str(config)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# The CLI, with every thread's stack printed on SIGUSR1: a run that hangs says where.
DUMPABLE_CLI = ("import faulthandler, signal; faulthandler.register(signal.SIGUSR1, all_threads=True); "
                "from sftcurate.cli import app; app()")


def finish(run: subprocess.Popen, timeout: float) -> tuple[str, str]:
    try:
        return run.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        run.send_signal(signal.SIGUSR1)
        time.sleep(2)
        run.kill()
        out, err = run.communicate()
        pytest.fail(f"the run hung for {timeout:.0f}s; its threads, the main one first:\n{main_first(err)[:12000]}")


def main_first(dump: str) -> str:
    """faulthandler's dump with the main thread's stack (the one that runs the CLI) moved to the front: CI keeps
    only part of a long failure message, and that stack says where the run is stuck."""
    blocks = dump.split("\n\n")
    main = [b for b in blocks if "sftcurate/cli.py" in b]
    return "\n\n".join(main + [b for b in blocks if b not in main])


def committed_whole(endpoint: str, bucket: str) -> list[str]:
    """Committed artifacts in the bucket, each checked whole (every listed file, its sha256)."""
    client = s3_client(endpoint)
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])]
    out = []
    for key in (k for k in keys if k.endswith("/_MANIFEST.json")):
        folder = key.rsplit("/", 1)[0]
        manifest = json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read())
        for name, info in manifest["files"].items():
            body = client.get_object(Bucket=bucket, Key=f"{folder}/{name}")["Body"].read()
            assert hashlib.sha256(body).hexdigest() == info["sha256"], f"{folder}: committed but {name} is not whole"
        out.append(folder)
    return out


@full_only  # by default the store-level stall shorter than the budget runs (test_storage_outage.py)
def test_a_stall_shorter_than_the_budget_mid_run_is_survived(tmp_path, moto):
    proc, endpoint = moto
    bucket = make_bucket(endpoint, "stall-short")
    run = start_run(tmp_path, endpoint, bucket, budget=60)
    state = stall_on_first_write(proc, endpoint, bucket, 4.0, run)
    out, err = finish(run, 150)
    state["thread"].join(timeout=30)
    assert "stopped_at" in state, "the run wrote nothing to S3: the stall was not exercised"
    assert state["stalled_for"] >= 3.9, state
    assert run.returncode == 0, err[-4000:]
    assert "Traceback" not in out + err
    kinds = {folder.split("/")[1] for folder in committed_whole(endpoint, bucket)}
    assert {"examples", "selection", "curated"} <= kinds, kinds


# 4 s, and in the full suite the default budget (120 s): a run used to spend a second budget deleting the folder
# it could not finish, and a try could outlast the budget by botocore's timeouts and attempts (about 4 minutes)
@pytest.mark.parametrize("budget", when_full([4], [4, 120]))
def test_a_stall_longer_than_the_budget_mid_run_is_one_line_and_exit_1(tmp_path, moto, budget):
    proc, endpoint = moto
    bucket = make_bucket(endpoint, "stall-long")
    run = start_run(tmp_path, endpoint, bucket, budget=budget)
    state = stall_on_first_write(proc, endpoint, bucket, None, run)  # stopped until the run gives up
    out, err = finish(run, budget + 150)
    state["thread"].join(timeout=30)
    assert "stopped_at" in state, "the run wrote nothing to S3: the stall was not exercised"
    gave_up_after = state["stalled_for"]
    assert run.returncode == 1, err[-4000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err[-4000:]
    assert errors[0].startswith(f"error: s3://{bucket}/store") and f"storage endpoint {endpoint} unreachable after " \
        in errors[0] and "check SFTCURATE_S3_ENDPOINT_URL and the network" in errors[0], errors[0]
    assert "Traceback" not in out + err and "╭" not in err, err[-4000:]
    # the budget, plus at most one short try and the process's exit (Prefect's shutdown): seconds, not minutes
    print(f"budget {budget} s: the run gave up {gave_up_after:.1f} s into the stall")
    assert budget <= gave_up_after < budget + 15, gave_up_after
    committed_whole(endpoint, bucket)  # whatever got committed before the stall is whole
