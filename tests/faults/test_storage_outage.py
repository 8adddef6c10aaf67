"""Issue 11, fault 2: an unreachable S3 endpoint.

Measured before the fix: a run gave up after ~347 s with 40 traceback boxes (botocore's retries inside s3fs's
retries inside Prefect's). Now the store retries for SFTCURATE_STORAGE_RETRY_SECONDS with backoff, then the CLI
prints one line and exits 1; an outage shorter than the budget is survived.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sftcurate.data_contracts.errors import DependencyError, UserError
from tests.conftest import free_port, wait_http
from tests.helpers import stop

pytestmark = pytest.mark.faults
MOTO = Path(sys.executable).with_name("moto_server")


def start_moto(port: int) -> subprocess.Popen:
    return subprocess.Popen([str(MOTO), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


@pytest.fixture
def s3_creds(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_REGION", "us-east-1")


@pytest.fixture
def own_moto(s3_creds, monkeypatch):
    """A moto server of this test's own, so the test can stop and continue the process."""
    port = free_port()
    proc = start_moto(port)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_http(endpoint, timeout=60)
        monkeypatch.setenv("SFTCURATE_S3_ENDPOINT_URL", endpoint)
        yield proc, endpoint
    finally:
        stop(proc)


def make_bucket(endpoint: str, name: str = "outage") -> str:
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


def test_unreachable_endpoint_raises_storage_unavailable_after_the_budget(s3_creds, monkeypatch):
    """The budget belongs to the outage: the first call waits it out, calls made during the same outage (the
    abort of the half-written folder, a parallel task) get one try each instead of a budget each, and once
    nobody has tried for a budget's time the next failure starts a new one."""
    from sftcurate.infra.store import StorageUnavailable, exists, read_bytes, write_bytes

    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("SFTCURATE_S3_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("SFTCURATE_STORAGE_RETRY_SECONDS", "2")
    took = []
    for call in (lambda: exists("s3://bucket/x/a"), lambda: read_bytes("s3://bucket/x/a"),
                 lambda: write_bytes("s3://bucket/x/a", b"data")):
        start = time.perf_counter()
        with pytest.raises(StorageUnavailable) as info:
            call()
        took.append(time.perf_counter() - start)
        message = str(info.value)
        assert message.startswith("s3://bucket/x") and f"storage endpoint {endpoint} unreachable after " in message
        assert "check SFTCURATE_S3_ENDPOINT_URL and the network" in message and "\n" not in message
    assert 2.0 <= took[0] < 15 and took[1] < 2.0 and took[2] < 2.0, took  # each alone would wait >= 2 s
    assert isinstance(info.value, DependencyError) and not isinstance(info.value, UserError)

    time.sleep(2.2)  # nobody tried for longer than the budget: the outage is over, a new one gets a new budget
    start = time.perf_counter()
    with pytest.raises(StorageUnavailable):
        exists("s3://bucket/x/a")
    assert 2.0 <= time.perf_counter() - start < 15


def test_a_try_never_outlasts_the_budget(s3_creds, monkeypatch):
    """A stalled endpoint accepts the connection and never answers: each request's timeouts are cut to what is
    left of the budget, so the run stops within the budget plus about a second, not a read timeout (20 s) or
    botocore's attempts on top."""
    from sftcurate.infra import retry
    from sftcurate.infra.settings import S3Settings

    config = S3Settings(retry_seconds=120).request_config()
    assert (config["connect_timeout"], config["read_timeout"]) == (5.0, 20.0)
    config = S3Settings(retry_seconds=120).request_config(seconds_left=7.2)
    assert config["read_timeout"] * config["retries"]["total_max_attempts"] <= 7.2
    assert S3Settings().request_config(seconds_left=0.1)["read_timeout"] == 1.0

    stalled = socket.socket()
    stalled.bind(("127.0.0.1", 0))
    stalled.listen(64)  # connections complete in the kernel's backlog; nothing ever reads them
    try:
        monkeypatch.setenv("SFTCURATE_S3_ENDPOINT_URL", f"http://127.0.0.1:{stalled.getsockname()[1]}")
        monkeypatch.setenv("SFTCURATE_STORAGE_RETRY_SECONDS", "3")
        from sftcurate.infra.store import StorageUnavailable, read_bytes

        start = time.perf_counter()
        with pytest.raises(StorageUnavailable):
            read_bytes("s3://bucket/stalled/a")
        took = time.perf_counter() - start
    finally:
        stalled.close()
    print(f"gave up after {took:.1f} s")
    assert 3.0 <= took < 3.0 + retry.MIN_TRY_SECONDS + 1.0, took


def test_an_upload_to_a_server_that_stalls_after_accepting_it_ends_within_the_budget(own_moto, monkeypatch):
    """The server stops between the bucket check and the PUT: aiohttp waits for `100 Continue` (botocore asks for
    it on every upload) with no timer armed, so the write used to hang for good (CI caught a run hung so). Every
    request now has a deadline (`infra.s3_session`): the write fails as an outage and the budget ends it."""
    from sftcurate.infra import retry
    from sftcurate.infra.store import StorageUnavailable, filesystem_for, write_bytes

    proc, endpoint = own_moto
    monkeypatch.setenv("SFTCURATE_STORAGE_RETRY_SECONDS", "3")
    uri = f"s3://{make_bucket(endpoint, 'put-stall')}/x/a"
    write_bytes(uri, b"warm")  # the client exists; the hook below goes on the one the store uses
    fs, _ = filesystem_for(uri)
    stopped = threading.Event()

    def stop_server(**_):
        if not stopped.is_set():
            proc.send_signal(signal.SIGSTOP)
            stopped.set()

    fs.s3.meta.events.register("before-send.s3.PutObject", stop_server)
    outcome: dict = {}

    def write() -> None:
        start = time.perf_counter()
        try:
            write_bytes(uri, b"x" * 100)
        except Exception as exc:  # noqa: BLE001 (the test checks which)
            outcome["error"] = exc
        outcome["took"] = time.perf_counter() - start

    worker = threading.Thread(target=write, daemon=True)
    try:
        worker.start()
        worker.join(60)
    finally:
        fs.s3.meta.events.unregister("before-send.s3.PutObject", stop_server)
        proc.send_signal(signal.SIGCONT)
    assert stopped.is_set(), "the PUT never went out: the stall was not exercised"
    assert "took" in outcome, "the write hung on the stalled PUT"
    assert isinstance(outcome.get("error"), StorageUnavailable), outcome
    assert 3.0 <= outcome["took"] < 3.0 + retry.MIN_TRY_SECONDS + 1.0, outcome["took"]


def test_a_missing_bucket_is_one_line_naming_it(own_moto):
    """Writes are one PUT each (no folder making, whose bucket checks were up to three more requests): a bucket
    that does not exist is a settings error naming it, not an outage, and nothing creates it behind the user."""
    from sftcurate.infra.settings import SettingsError
    from sftcurate.infra.store import exists, write_bytes

    with pytest.raises(SettingsError, match=r"s3://no-such-bucket/x/a: the bucket 'no-such-bucket' does not exist"):
        write_bytes("s3://no-such-bucket/x/a", b"data")
    assert isinstance(SettingsError("x"), UserError)
    make_bucket(own_moto[1], "no-such-bucket")
    assert not exists("s3://no-such-bucket/x/a")


def test_an_outage_translated_inside_an_except_block_is_still_an_outage():
    """A client that re-raises its own error while handling a connection error, without `from`, leaves the
    outage only in `__context__`: still retried, while an answer (a missing key) is not."""
    from botocore.exceptions import EndpointConnectionError

    from sftcurate.infra.store import unreachable

    def translated(inner: BaseException) -> BaseException:
        try:
            try:
                raise inner
            except Exception:
                raise OSError("the client's own wrapper")  # no `from`: implicit context only
        except OSError as exc:
            return exc

    outage = translated(EndpointConnectionError(endpoint_url="http://127.0.0.1:9"))
    assert outage.__cause__ is None and outage.__context__ is not None
    assert unreachable(outage)
    assert not unreachable(translated(FileNotFoundError("s3://bucket/missing")))
    assert not unreachable(FileNotFoundError("s3://bucket/missing"))


def test_bad_budget_setting_is_a_user_error(monkeypatch):
    from sftcurate.infra.settings import SettingsError, load_settings

    monkeypatch.setenv("SFTCURATE_STORAGE_RETRY_SECONDS", "soon")
    with pytest.raises(SettingsError, match="SFTCURATE_STORAGE_RETRY_SECONDS='soon'"):
        load_settings()


def test_a_stalled_endpoint_shorter_than_the_budget_is_survived(own_moto, monkeypatch):
    """SIGSTOP the S3 server for 2 s while an artifact is written: the commit waits and succeeds."""
    from sftcurate.infra.store import ArtifactStore, is_committed, read_bytes, read_manifest

    proc, endpoint = own_moto
    monkeypatch.setenv("SFTCURATE_STORAGE_RETRY_SECONDS", "30")
    root = f"s3://{make_bucket(endpoint)}/store"
    payload = os.urandom(3 << 20)
    store = ArtifactStore(root)
    assert store.committed("blob", "warm") is None  # the client is set up before the stall

    proc.send_signal(signal.SIGSTOP)
    resume = threading.Timer(2.0, proc.send_signal, (signal.SIGCONT,))
    resume.start()
    start = time.perf_counter()
    try:
        writer = store.begin("blob", "k1")
        writer.write_bytes("payload.bin", payload)
        uri = writer.commit()
    finally:
        resume.join()
    took = time.perf_counter() - start
    assert took >= 1.9, f"the write did not wait for the stalled server ({took:.1f}s)"
    assert is_committed(uri) and read_bytes(f"{uri}/payload.bin") == payload
    assert read_manifest(uri)["files"]["payload.bin"]["bytes"] == len(payload)


def test_an_endpoint_that_comes_back_within_the_budget_is_retried(s3_creds, monkeypatch):
    """Connection refused until a server starts on the port (a restart): the write retries with backoff. The
    server starts at the first backoff wait, so the outage is exercised however slow the machine is."""
    import types

    from sftcurate.infra import retry
    from sftcurate.infra.store import read_bytes, write_bytes

    port = free_port()
    monkeypatch.setenv("SFTCURATE_S3_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("SFTCURATE_STORAGE_RETRY_SECONDS", "90")
    procs: list[subprocess.Popen] = []
    waits: list[float] = []

    def sleep_then_restart(seconds: float) -> None:
        waits.append(seconds)
        if not procs:
            procs.append(start_moto(port))
            wait_http(f"http://127.0.0.1:{port}", timeout=60)
            make_bucket(f"http://127.0.0.1:{port}", "comeback")  # a fresh moto is empty; the store makes no bucket
        time.sleep(seconds)

    monkeypatch.setattr(retry, "time", types.SimpleNamespace(monotonic=time.monotonic, time=time.time,
                                                             sleep=sleep_then_restart))
    try:
        write_bytes("s3://comeback/x/data.bin", b"survived")
        assert read_bytes("s3://comeback/x/data.bin") == b"survived"
    finally:
        for proc in procs:
            stop(proc)
    assert waits and waits[0] == retry.FIRST_BACKOFF_SECONDS, "the first try did not fail: no outage exercised"


def test_storage_unavailable_is_not_retried_by_prefect(prefect_harness, s3_creds, monkeypatch):
    """The store already spent the budget: Prefect's task retries on top would multiply it."""
    from prefect import flow

    from sftcurate.infra.store import StorageUnavailable
    from sftcurate.tasks.common import call, stage_task

    calls = []

    @stage_task("outage")
    def outage_task() -> str:
        calls.append(1)
        raise StorageUnavailable("s3://bucket/x: storage endpoint http://127.0.0.1:9 unreachable")

    @stage_task("flaky")
    def flaky_task() -> str:
        calls.append(2)
        if calls.count(2) == 1:
            raise ConnectionResetError("a crash Prefect should retry")
        return "s3://bucket/x/ok"

    @flow(name="faults-outage")
    def run() -> None:
        assert call(flaky_task) == "s3://bucket/x/ok"
        call(outage_task)

    with pytest.raises(StorageUnavailable):
        run()
    assert calls.count(2) == 2 and calls.count(1) == 1


def test_cli_prints_one_line_and_exits_1_when_the_store_is_unreachable(prefect_harness, tmp_path):
    from prefect.settings import PREFECT_API_URL

    endpoint = f"http://127.0.0.1:{free_port()}"
    config = tmp_path / "tiny.yaml"
    config.write_text("name: outage\nsource: {uri: 'builtin:python-docs', limit: 40}\n"
                      "selection: {method: uniform, budget: 5}\nmodels: {target: tiny-gpt2, max_length: 64}\n")
    env = {**os.environ, "SFTCURATE_STORE": "s3://bucket/x", "SFTCURATE_S3_ENDPOINT_URL": endpoint,
           "SFTCURATE_STORAGE_RETRY_SECONDS": "3", "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_REGION": "us-east-1", "PREFECT_API_URL": PREFECT_API_URL.value() or "", "COLUMNS": "200"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", "from sftcurate.cli import app; app()", "run", str(config)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    took = time.perf_counter() - start
    assert proc.returncode == 1, proc.stderr[-4000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-4000:]
    assert errors[0].startswith("error: s3://bucket/x") and f"storage endpoint {endpoint} unreachable" in errors[0]
    # said once: no traceback (plain or boxed), no other line repeating the failure; what else is on stderr is
    # the progress display every run prints (Prefect's "Beginning flow run", the stage that failed)
    assert "Traceback" not in proc.stderr + proc.stdout and "╭" not in proc.stderr, proc.stderr[-4000:]
    repeats = [line for line in lines if line not in errors and ("StorageUnavailable" in line or endpoint in line)]
    assert not repeats, proc.stderr[-4000:]
    assert took < 60, f"{took:.0f}s"
