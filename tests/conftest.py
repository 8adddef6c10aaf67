"""Session fixtures: an isolated SFTCURATE_HOME (so Prefect results, MLflow and artifacts never leak between
sessions), the real Prefect engine on an ephemeral test server, and a real S3 API server (moto) on loopback."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

_HOME = tempfile.mkdtemp(prefix="sftcurate-test-")
for _var in ("MLFLOW_TRACKING_URI", "SFTCURATE_STORE", "PREFECT_API_URL", "PREFECT_HOME", "PREFECT_LOCAL_STORAGE_PATH",
             "SFTCURATE_TASK_RUNNER", "SFTCURATE_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL"):
    os.environ.pop(_var, None)
os.environ["SFTCURATE_HOME"] = _HOME
# A test that unsets SFTCURATE_HOME falls back to the per-user home: keep it inside the session home too (the
# model cache is SFTCURATE_MODEL_CACHE, below; XDG_CACHE_HOME stays: Hugging Face's cache lives under it).
os.environ["XDG_DATA_HOME"] = str(Path(_HOME) / "xdg-data")
# Converted built-in models are large and identical for every session: share them when the caller says so.
os.environ.setdefault("SFTCURATE_MODEL_CACHE", os.environ.get("SFTCURATE_TEST_MODEL_CACHE", str(Path(_HOME) / "models")))

import sftcurate.infra  # noqa: E402,F401  (applies the environment defaults with the session home)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _cleanup_home():
    yield
    shutil.rmtree(_HOME, ignore_errors=True)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Test models are tiny: a second thread only adds contention on a 2-core machine (2-4x slower there)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def store_root(tmp_path, monkeypatch) -> str:
    root = str(tmp_path / "artifacts")
    monkeypatch.setenv("SFTCURATE_STORE", root)
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 30.0) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except Exception:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up in {timeout}s")


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server mode on a free loopback port: a real S3 API over HTTP."""
    port = free_port()
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_http(endpoint)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Credentials and endpoint for the moto server; returns a function that makes a fresh bucket."""
    monkeypatch.setenv("SFTCURATE_S3_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_REGION", "us-east-1")

    def make_bucket() -> str:
        import boto3

        name = f"test-{uuid.uuid4().hex[:12]}"
        boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
        return name

    return make_bucket


@pytest.fixture
def s3_store(s3_env, monkeypatch) -> str:
    root = f"s3://{s3_env()}/sftcurate"
    monkeypatch.setenv("SFTCURATE_STORE", root)
    return root


def committed_manifests(root: str) -> list[str]:
    """Every committed artifact under a store root (local or s3)."""
    from sftcurate.infra.store import filesystem_for

    fs, path = filesystem_for(root)
    if not fs.exists(path):
        return []
    return sorted(p for p in fs.find(path) if p.endswith("_MANIFEST.json"))
