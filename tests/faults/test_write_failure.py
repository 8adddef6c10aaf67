"""Issue 11, fault 6: a write failing mid-artifact (a full disk).

Measured before the fix: `sftcurate run` with its store on a full disk printed Prefect's and Python's tracebacks
ending in `OSError: [Errno 28] No space left on device` (the file's name appears nowhere). Now the CLI prints one
line naming the file being written and what to do, exit status 1; the artifact being written has no manifest
(nothing committed), and after space is freed a rerun reuses what was committed and finishes.

Two disks: an fsspec filesystem that runs out of room after N bytes (the failure lands in a chosen artifact,
mid-file), and, where this machine lets the test mount one, a real 8 KiB tmpfs.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from fsspec import register_implementation
from fsspec.implementations.memory import MemoryFile, MemoryFileSystem

from tests.faults.full import full_only, when_full
from tests.helpers import invoke, qa_records, write_jsonl

pytestmark = [pytest.mark.faults, pytest.mark.usefixtures("prefect_harness")]

CONFIG = """name: disk-full
source: {{uri: {data}, heldout_fraction: 0.1}}
selection: {{method: uniform, budget: 6}}
models: {{target: tiny-gpt2, max_length: 64}}
"""


class SmallDisk(MemoryFileSystem):
    """An in-memory disk of `capacity` bytes (None: unlimited). A write that does not fit writes what fits and
    raises ENOSPC, with no file name, as write(2) on a full disk does."""

    protocol = "smalldisk"
    store: dict = {}
    pseudo_dirs = [""]
    capacity: int | None = None

    @classmethod
    def used(cls) -> int:
        return sum(f.getbuffer().nbytes for f in cls.store.values())

    @classmethod
    def reset(cls, capacity: int | None = None) -> None:
        cls.store.clear()
        cls.pseudo_dirs[:] = [""]
        cls.capacity = capacity

    def _open(self, path, mode="rb", block_size=None, autocommit=True, cache_options=None, **kwargs):
        if mode in {"wb", "w+b", "xb", "x+b"}:
            f = _SmallDiskFile(self, self._strip_protocol(path), None)
            f.commit()  # like the memory filesystem (and a disk): the file exists from the open on
            return f
        return super()._open(path, mode, block_size, autocommit, cache_options, **kwargs)


class _SmallDiskFile(MemoryFile):
    def write(self, data) -> int:
        if SmallDisk.capacity is not None:
            room = SmallDisk.capacity - SmallDisk.used()
            if len(data) > room:
                super().write(bytes(memoryview(data)[:max(room, 0)]))
                raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(data)


register_implementation(SmallDisk.protocol, SmallDisk, clobber=True)


def committed(root: str) -> dict[str, bytes]:
    """Committed manifests under a store root (any fsspec URI) -> their bytes; checks each one is whole."""
    from sftcurate.infra.store import filesystem_for

    fs, path = filesystem_for(root)
    out = {}
    for manifest in (p for p in fs.find(path) if p.endswith("_MANIFEST.json")):
        data = fs.cat_file(manifest)
        folder = manifest.rsplit("/", 1)[0]
        for name, info in json.loads(data)["files"].items():
            body = fs.cat_file(f"{folder}/{name}")
            assert hashlib.sha256(body).hexdigest() == info["sha256"], f"{folder}: committed but {name} is incomplete"
        out[manifest[len(path):].lstrip("/")] = data
    return out


def capacities_mid_artifact(root: str) -> list[int]:
    """For each artifact a complete run committed, in commit order: a disk size that fills up halfway through it
    (everything committed before it fits)."""
    prefix = SmallDisk._strip_protocol(root)
    files = {p: f for p, f in SmallDisk.store.items() if p.startswith(prefix + "/")}
    manifests = sorted((f.modified, p.rsplit("/", 1)[0]) for p, f in files.items() if p.endswith("/_MANIFEST.json"))
    out, used = [], 0
    for _, folder in manifests:
        size = sum(f.getbuffer().nbytes for p, f in files.items() if p.startswith(folder + "/"))
        out.append(used + size // 2)
        used += size
    return out


def capacity_mid_manifest(root: str, n: int) -> int:
    """A disk size that fills up halfway through the n-th artifact's manifest (its files and everything before fit)."""
    prefix = SmallDisk._strip_protocol(root)
    files = {p: f for p, f in SmallDisk.store.items() if p.startswith(prefix + "/")}
    manifests = sorted((f.modified, p) for p, f in files.items() if p.endswith("/_MANIFEST.json"))
    folders = [p.rsplit("/", 1)[0] for _, p in manifests]
    before = sum(f.getbuffer().nbytes for p, f in files.items() if any(p.startswith(d + "/") for d in folders[:n]))
    data = sum(f.getbuffer().nbytes for p, f in files.items()
               if p.startswith(folders[n] + "/") and not p.endswith("/_MANIFEST.json"))
    return before + data + files[manifests[n][1]].getbuffer().nbytes // 2


def one_error_line(output: str) -> str:
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output[-3000:]
    assert "Traceback" not in output
    return errors[0]


@pytest.fixture
def config(tmp_path) -> Path:
    return write_config(tmp_path)


def write_config(folder: Path) -> Path:
    path = folder / "disk-full.yaml"
    path.write_text(CONFIG.format(data=write_jsonl(folder / "pool.jsonl", qa_records(40))))
    return path


@dataclass
class DiskReference:
    config: Path
    manifests: dict[str, bytes]   # what a run with room to spare commits
    capacities: list[int]         # per artifact, in commit order: a disk that fills up halfway through it
    mid_manifest: int             # a disk that fills up halfway through the first artifact's manifest


@pytest.fixture(scope="module")
def disk_reference(tmp_path_factory, prefect_harness) -> DiskReference:
    config = write_config(tmp_path_factory.mktemp("disk-full"))
    SmallDisk.reset()
    root = f"smalldisk://{uuid.uuid4().hex[:8]}/store"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SFTCURATE_STORE", root)
        result = invoke("run", config)
    assert result.exit_code == 0, result.output[-3000:]
    reference = committed(root)
    assert len(reference) >= 3  # examples, selection, curated records
    yield DiskReference(config, reference, capacities_mid_artifact(root), capacity_mid_manifest(root, 0))
    SmallDisk.reset()


# the disk fills halfway through the n-th artifact a run commits (examples, selection, curated records)
ARTIFACTS = when_full([1], [0, 1, 2])


@pytest.mark.parametrize("artifact", ARTIFACTS, ids=[f"artifact-{n}" for n in ARTIFACTS])
def test_a_full_disk_mid_artifact_is_one_line_commits_nothing_and_a_rerun_finishes(disk_reference, artifact,
                                                                                   monkeypatch):
    capacity = disk_reference.capacities[artifact]
    SmallDisk.reset(capacity=capacity)
    root = f"smalldisk://{uuid.uuid4().hex[:8]}/store"
    monkeypatch.setenv("SFTCURATE_STORE", root)
    result = invoke("run", disk_reference.config)
    assert result.exit_code == 1, (capacity, result.output[-3000:], result.exception)
    line = one_error_line(result.output)
    assert "no space left on device (the disk is full)" in line and "SFTCURATE_STORE" in line, line
    written = line.removeprefix("error: ").split(": no space left", 1)[0]
    assert f"{root.split('://', 1)[1]}/" in written, line  # names the file in the store it was writing
    left = committed(root)  # whatever was committed is whole
    print(f"disk full at {capacity} bytes: failed writing {written}; {len(left)} committed before")
    assert len(left) == artifact and set(left) < set(disk_reference.manifests), sorted(left)
    folder = written.rsplit("/", 1)[0]
    assert not SmallDisk().exists(f"{folder}/_MANIFEST.json"), f"{folder} was committed"

    SmallDisk.capacity = None  # space freed: the rerun finishes and rebuilds nothing that was committed
    result = invoke("run", disk_reference.config)
    assert result.exit_code == 0, result.output[-3000:]
    after = committed(root)
    assert set(after) == set(disk_reference.manifests)
    assert all(after[rel] == data for rel, data in left.items()), "a committed artifact was rebuilt"


def test_a_disk_that_fills_during_the_manifest_write_commits_nothing(disk_reference, monkeypatch):
    """The manifest is the commit: one that fills the disk halfway must not count (it used to: the store wrote it
    in place, and Prefect's retry and every rerun then 'reused' the half-written artifact and failed on it)."""
    SmallDisk.reset(capacity=disk_reference.mid_manifest)
    root = f"smalldisk://{uuid.uuid4().hex[:8]}/store"
    monkeypatch.setenv("SFTCURATE_STORE", root)
    result = invoke("run", disk_reference.config)
    assert result.exit_code == 1 and "_MANIFEST.json: no space left on device" in one_error_line(result.output)
    SmallDisk.capacity = None
    assert committed(root) == {}, "a partly written manifest counts as committed"  # parses every manifest
    result = invoke("run", disk_reference.config)
    assert result.exit_code == 0, result.output[-3000:]


def test_a_full_disk_is_not_retried_by_prefect(prefect_harness):
    """The disk is still full two seconds later: Prefect's task retries would only repeat the failure (and its
    log lines); an EIO (flaky hardware, a crash) is still retried."""
    from prefect import flow

    from sftcurate.tasks.common import call, stage_task

    calls = []

    @stage_task("full-disk")
    def full_disk_task() -> str:
        calls.append("full")
        raise OSError(errno.ENOSPC, "No space left on device")

    @stage_task("flaky-disk")
    def flaky_disk_task() -> str:
        calls.append("flaky")
        if calls.count("flaky") == 1:
            raise OSError(errno.EIO, "Input/output error")
        return "done"

    @flow(name="faults-full-disk")
    def run() -> None:
        assert call(flaky_disk_task) == "done"
        call(full_disk_task)

    with pytest.raises(OSError, match="No space left"):
        run()
    assert calls.count("flaky") == 2 and calls.count("full") == 1


@pytest.mark.parametrize("errno_", [errno.EIO, errno.ENOSPC], ids=["EIO", "ENOSPC"])
def test_only_a_full_disk_becomes_one_line(tmp_path, monkeypatch, errno_):
    """An unexpected OSError is a bug and keeps its traceback; ENOSPC on the same write is one line, exit 1.
    (`select` writes its output through the store with no flow around it.)"""
    import numpy as np
    from safetensors.numpy import save_file

    import sftcurate.infra.store as store

    def broken(uri, data):
        raise OSError(errno_, os.strerror(errno_))

    features = tmp_path / "f.safetensors"
    save_file({"features": np.ones((6, 4), np.float32), "offsets": np.array([0, 2, 4, 6], np.int64)}, str(features))
    monkeypatch.setattr(store, "write_bytes", broken)
    result = invoke("select", "fishersft", "--features", features, "--budget", "2", "--out", tmp_path / "sel.parquet")
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    if errno_ == errno.EIO:
        assert isinstance(result.exception, OSError) and result.exception.errno == errno.EIO, result.output[-2000:]
        assert not errors
    else:
        assert result.exit_code == 1 and len(errors) == 1, result.output[-2000:]
        assert errors[0].startswith(f"error: {tmp_path / 'sel.parquet'}: no space left on device"), errors[0]


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A real 8 KiB tmpfs: a disk that is full after two pages. Needs the right to mount (root in a container
    with CAP_SYS_ADMIN); the fsspec disk above covers the same path everywhere else."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8k", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@full_only
def test_a_real_full_disk_in_a_real_process(config, tiny_tmpfs):
    from prefect.settings import PREFECT_API_URL

    store = tiny_tmpfs / "store"
    env = {**os.environ, "SFTCURATE_STORE": str(store), "PREFECT_API_URL": PREFECT_API_URL.value() or "",
           "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-c", "from sftcurate.cli import app; app()", "run", str(config)],
                          capture_output=True, text=True, env=env, timeout=300, cwd=config.parent)
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = one_error_line(proc.stderr)
    assert line.startswith(f"error: {store}/examples/") and "no space left on device" in line, line
    assert "╭" not in proc.stderr, proc.stderr[-3000:]
    assert not list(store.rglob("_MANIFEST.json")), "an artifact was committed on a full disk"
