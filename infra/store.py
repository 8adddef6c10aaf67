"""Artifact store on fsspec: a local folder by default, `s3://bucket/prefix` through s3fs.

Every artifact is a folder `<root>/<kind>/<key>/` whose files are written first and whose `_MANIFEST.json`
is written last. Readers only trust folders with a manifest, so a crash never leaves a half-artifact that
looks complete. Keys are content addresses (fingerprints of inputs + parameters + code), which makes a
re-run with the same inputs find the artifact already committed. Readers trust a manifest only while the files
match it (verified reads, `artifact_damage`): a damaged artifact is rebuilt by its stage, never used.

Longer than most modules because its parts share one set of primitives (`filesystem_for`, `retrying`, whole
writes): the retry loop for S3, typed IO validated by the contracts, the writer and its manifest, verified reads.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import struct
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TypeVar

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from botocore.exceptions import ConnectionError as BotoConnectionError, HTTPClientError
from safetensors.numpy import load as load_safetensors, save as save_safetensors

from sftcurate.data_contracts import Contract, ContractError, TensorContract, validate_table, validate_tensors
from sftcurate.data_contracts.errors import DependencyError, chain
from sftcurate.infra.retry import NETWORK_ERRNOS, retry_while_unreachable, seconds_left
from sftcurate.infra.settings import SettingsError, load_settings

MANIFEST = "_MANIFEST.json"
# s3fs retries timeouts five times inside every call, each try up to the read timeout: `retrying` is the one
# retry loop, so s3fs makes one try.
S3FS_TRIES = 1

log = logging.getLogger("sftcurate.store")
T = TypeVar("T")


class StorageUnavailable(DependencyError):
    """The S3 endpoint stayed unreachable for SFTCURATE_STORAGE_RETRY_SECONDS: an outage, not bad input."""


def storage_options_for(uri: str, left: float | None = None) -> dict:
    """fsspec options for `uri`: for S3 the endpoint, credentials and request timeouts (cut to the `left`
    seconds of a retry budget; the whole budget by default), every request under a deadline (`infra.s3_session`)."""
    if not uri.startswith("s3://"):
        return {}
    # deferred on purpose: aiobotocore and aiohttp (a few hundred modules), needed for s3:// URIs only
    from sftcurate.infra.s3_session import DeadlineSession

    options = load_settings().s3.storage_options(left)
    options["config_kwargs"]["http_session_cls"] = DeadlineSession
    return options


def filesystem_for(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and bare path for any URI (local path, file://, s3://, memory://). Inside a retry loop an
    S3 request waits no longer than what is left of the outage's budget."""
    fs, path = fsspec.core.url_to_fs(uri, **storage_options_for(uri, seconds_left()))
    if uri.startswith("s3://"):
        fs.retries = S3FS_TRIES
    return fs, path


def unreachable(exc: BaseException | None) -> bool:
    """Whether an error, or any error it was raised from or while handling, says the endpoint did not answer:
    refused, reset, timed out, no route. A missing file, a denied request or a bad bucket name are answers, not
    outages. The implicit context counts: a client that translates a connection error inside its `except` block
    without `from` still reports an outage."""
    network = (BotoConnectionError, HTTPClientError, ConnectionError, TimeoutError)
    return any(isinstance(e, network) or (isinstance(e, OSError) and e.errno in NETWORK_ERRNOS) for e in chain(exc))


def retrying(uri: str, operation: Callable[[], T]) -> T:
    """`operation()` (fsspec calls on `uri`), tried again with backoff while an S3 endpoint cannot be reached,
    until SFTCURATE_STORAGE_RETRY_SECONDS of the outage have passed (`infra.retry`); then StorageUnavailable.
    Every operation wrapped here may run more than once, so each one writes or reads a whole object. Local paths
    get one try: an OSError on a local disk is not an outage that waiting cures."""
    if not uri.startswith("s3://"):
        return operation()
    s3 = load_settings().s3
    return retry_while_unreachable(
        operation, endpoint=f"s3:{s3.endpoint_url}", budget=s3.retry_seconds, unreachable=unreachable,
        give_up=lambda tries, elapsed: StorageUnavailable(unavailable_message(uri, tries, elapsed)),
        log=log, what=f"{uri}: storage endpoint")


def unavailable_message(uri: str, tries: int, elapsed: float) -> str:
    endpoint = load_settings().s3.endpoint_url or "(the AWS default for the region)"
    return (f"{uri}: storage endpoint {endpoint} unreachable after {tries} {'try' if tries == 1 else 'tries'} "
            f"over {elapsed:.0f} s; check SFTCURATE_S3_ENDPOINT_URL and the network")


def join(base: str, *parts: str) -> str:
    out = base.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def read_bytes(uri: str) -> bytes:
    def read() -> bytes:
        fs, path = filesystem_for(uri)
        with fs.open(path, "rb") as f:
            return f.read()

    return retrying(uri, read)


@contextlib.contextmanager
def naming_the_file(uri: str):
    """An OSError while writing `uri` that names no file (write(2) on a full disk names none) names `uri`, so an
    error message can say which file failed."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None:
            exc.filename = uri
        raise


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole object. On S3 that is one PUT: no folder to make (s3fs's makedirs checked the bucket with up
    to three requests per file, each one more wait when the endpoint stalls), so a bucket must exist."""
    @naming_the_file(uri)
    def write() -> None:
        fs, path = filesystem_for(uri)
        if uri.startswith("s3://"):
            try:
                return fs.pipe_file(path, data)
            except FileNotFoundError:
                bucket = path.split("/", 1)[0]
                raise SettingsError(f"{uri}: the bucket '{bucket}' does not exist; create it, or point "
                                    "SFTCURATE_STORE at one that does") from None
        parent = path.rsplit("/", 1)[0]
        if parent:
            fs.makedirs(parent, exist_ok=True)
        with fs.open(path, "wb") as f:
            f.write(data)

    retrying(uri, write)


def write_whole(uri: str, data: bytes) -> None:
    """Write `uri` so that a reader sees either nothing or all of `data`, never a prefix: an S3 PUT is whole by
    itself; on a filesystem the bytes go to a temporary name beside it (flushed to the device where it has one)
    and are renamed over it. A write that fails (a full disk, a kill) leaves no file under `uri`."""
    if uri.startswith("s3://"):
        return write_bytes(uri, data)
    fs, path = filesystem_for(uri)
    partial = f"{path}.{uuid.uuid4().hex[:12]}.partial"
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.makedirs(parent, exist_ok=True)
    try:
        with naming_the_file(uri), fs.open(partial, "wb") as f:
            f.write(data)
            f.flush()
            with contextlib.suppress(AttributeError, io.UnsupportedOperation):  # in-memory files have no device
                os.fsync(f.fileno())
        fs.mv(partial, path)
    except BaseException:
        with contextlib.suppress(Exception):
            fs.rm(partial)
        raise


def file_digest(uri: str) -> bytes:
    """sha256 of a file's bytes (local path or any fsspec URI), read a block at a time. One try: wrap it in
    `retrying` where an outage should be waited out."""
    fs, path = filesystem_for(uri)
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.digest()


def exists(uri: str) -> bool:
    def check() -> bool:
        fs, path = filesystem_for(uri)
        return fs.exists(path)

    return retrying(uri, check)


# ---------------------------------------------------------------- typed file IO (validated on write and read)

def table_to_bytes(table: pa.Table, contract: Contract, where: str) -> bytes:
    table = validate_table(table, contract, where)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def write_table(uri: str, table: pa.Table, contract: Contract) -> None:
    data = table_to_bytes(table, contract, uri)
    with naming_the_file(uri):   # here too: the error names the table's file whatever writes the bytes below
        write_bytes(uri, data)


def read_table(uri: str, contract: Contract) -> pa.Table:
    try:
        data = read_bytes(uri)
    except FileNotFoundError as exc:
        raise ContractError(f"{uri}: file not found") from exc
    try:
        table = pq.read_table(io.BytesIO(data))
    except pa.ArrowInvalid as exc:
        raise ContractError(f"{uri}: not a readable parquet file ({exc})") from exc
    return validate_table(table, contract, uri)


def tensors_to_bytes(tensors: dict[str, np.ndarray], contract: TensorContract, where: str,
                     metadata: dict[str, str] | None = None) -> bytes:
    validate_tensors(tensors, contract, where)
    meta = {**(metadata or {}), **contract.metadata()}
    return save_safetensors({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=meta)


def write_tensors(uri: str, tensors: dict[str, np.ndarray], contract: TensorContract,
                  metadata: dict[str, str] | None = None) -> None:
    write_bytes(uri, tensors_to_bytes(tensors, contract, uri, metadata))


def safetensors_metadata(data: bytes) -> dict[str, str]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]).get("__metadata__", {}) or {}


def read_tensors(uri: str, contract: TensorContract) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    try:
        data = read_bytes(uri)
    except FileNotFoundError as exc:
        raise ContractError(f"{uri}: file not found") from exc
    try:
        meta = safetensors_metadata(data)
        tensors = load_safetensors(data)
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise ContractError(f"{uri}: not a readable safetensors file ({exc})") from exc
    validate_tensors(tensors, contract, uri, meta)
    return tensors, meta


# ---------------------------------------------------------------- committed artifacts

def remove_tree(uri: str) -> None:
    """Delete a folder (local or s3://) and everything under it; a folder already gone is fine. An unreachable
    endpoint is retried and then raised (StorageUnavailable is no OSError): skipping the delete would mix a
    crashed attempt's files into the next one."""

    def remove() -> None:
        fs, path = filesystem_for(uri)
        if fs.exists(path):
            fs.rm(path, recursive=True)

    try:
        retrying(uri, remove)
    except OSError:
        pass


def _finite(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def strict_json(obj) -> bytes:
    """Standard JSON (NaN and inf become null), so jq, browsers and other languages read every manifest."""
    return json.dumps(_finite(obj), indent=2, sort_keys=True, default=str, allow_nan=False).encode()


@dataclass
class ArtifactWriter:
    """Collects files of one artifact; `commit()` writes the manifest last."""

    uri: str
    kind: str
    key: str
    meta: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)

    def path(self, name: str) -> str:
        return join(self.uri, name)

    def _record(self, name: str, data: bytes) -> str:
        write_bytes(self.path(name), data)
        self.files[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        return self.path(name)

    def write_bytes(self, name: str, data: bytes) -> str:
        return self._record(name, data)

    def write_json(self, name: str, obj) -> str:
        return self._record(name, strict_json(obj))

    def write_table(self, name: str, table: pa.Table, contract: Contract) -> str:
        return self._record(name, table_to_bytes(table, contract, self.path(name)))

    def write_tensors(self, name: str, tensors: dict[str, np.ndarray], contract: TensorContract,
                      metadata: dict[str, str] | None = None) -> str:
        return self._record(name, tensors_to_bytes(tensors, contract, self.path(name), metadata))

    def commit(self) -> str:
        manifest = {"kind": self.kind, "key": self.key, "created": time.time(), "files": self.files, "meta": self.meta}
        write_whole(self.path(MANIFEST), strict_json(manifest))  # its presence is the commit: never a prefix
        self._remember_written()
        return self.uri

    def _remember_written(self) -> None:
        """The bytes just written are the ones hashed into the manifest: a local store's next read need not hash
        them again (S3 has no identity to remember before its listing, so it verifies once)."""
        if "://" in self.uri and not self.uri.startswith("file://"):
            return
        root = filesystem_for(self.uri)[1].rstrip("/")
        for name, found in _identities(None, root, sorted(self.files), remote=False).items():
            if found is not None and found[0] == self.files[name]["bytes"]:
                _remember_verified(*_verified_record((*found[1], self.files[name]["sha256"])))

    def abort(self) -> None:
        remove_tree(self.uri)


class ArtifactStore:
    def __init__(self, root: str | None = None):
        self.root = (root or load_settings().store_uri).rstrip("/")

    def uri(self, kind: str, key: str) -> str:
        return join(self.root, kind, key)

    def committed(self, kind: str, key: str) -> str | None:
        uri = self.uri(kind, key)
        return uri if is_committed(uri) else None

    def begin(self, kind: str, key: str) -> ArtifactWriter:
        writer = ArtifactWriter(uri=self.uri(kind, key), kind=kind, key=key)
        writer.abort()  # leftovers of a crashed attempt are never mixed into a new one
        return writer


def root_of(artifact_uri: str) -> str:
    """The store an artifact lives in: every artifact is the folder `<root>/<kind>/<key>` (`ArtifactStore.uri`)."""
    return artifact_uri.rstrip("/").rsplit("/", 2)[0]


def is_committed(uri: str) -> bool:
    return exists(join(uri, MANIFEST))


def read_manifest(uri: str, verify: bool = True) -> dict:
    """A committed artifact's manifest; with `verify` (the default) only once its files match it (DamagedArtifact
    otherwise): every reader of an artifact reads its manifest first, so no reader uses a damaged one."""
    if not is_committed(uri):
        raise ContractError(f"{uri}: no {MANIFEST}; the artifact was never committed (re-run the task that writes it)")
    manifest = json.loads(read_bytes(join(uri, MANIFEST)))
    damage = artifact_damage(uri, manifest) if verify else None
    if damage:
        raise DamagedArtifact(f"{uri}: damaged artifact ({damage}); run the command that built it again to "
                              "rebuild it (`sftcurate verify` checks the whole store)")
    return manifest


# ---------------------------------------------------------------- verified reads
#
# A committed artifact's files are checked against the sizes and sha256s its manifest records before any reader
# trusts it: sizes on every read (a stat, or one listing on S3); a file's hash once per identity (local: path,
# size, mtime, inode; S3: key, size, ETag), remembered in this process and under $SFTCURATE_HOME/cache/verified,
# so hashing the 8 GB of a 10^6-sentence pool's features is paid once, not per run. A file altered in place keeps
# neither its mtime nor its ETag, so it is hashed again and caught.

class DamagedArtifact(DependencyError):
    """A committed artifact whose files no longer match its manifest (missing, truncated, altered after the
    commit): the store was damaged, not the user's input. `build_once` rebuilds such an artifact."""


_verified_here: set[str] = set()


def _verified_record(identity: tuple) -> tuple[str, Path]:
    token = hashlib.sha256(json.dumps(identity, default=str).encode()).hexdigest()
    return token, load_settings().home / "cache" / "verified" / token[:2] / token


def _identities(fs, root: str, names, remote: bool) -> dict[str, tuple[int, tuple] | None]:
    """name -> (size, identity) of each listed file, None when it is missing."""
    if remote:
        found = fs.find(root, detail=True)
        out = {}
        for name in names:
            info = found.get(f"{root}/{name}")
            out[name] = None if info is None else (int(info.get("size") or 0), (
                f"{root}/{name}", int(info.get("size") or 0),
                str(info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("created") or "")))
        return out
    out = {}
    for name in names:
        try:
            st = os.stat(f"{root}/{name}")
        except (FileNotFoundError, NotADirectoryError):
            out[name] = None
            continue
        out[name] = (st.st_size, (os.path.realpath(f"{root}/{name}"), st.st_size, st.st_mtime_ns, st.st_ino))
    return out


def artifact_damage(uri: str, manifest: dict | None = None) -> str | None:
    """What is wrong with a committed artifact's files (one phrase naming the file), or None when every file its
    manifest lists is there with its recorded size and sha256."""
    try:
        manifest = manifest if manifest is not None else json.loads(read_bytes(join(uri, MANIFEST)))
        listed = manifest.get("files") or {}
        sizes = {name: int(record["bytes"]) for name, record in listed.items()}
    except FileNotFoundError:
        return f"{MANIFEST} is missing"
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"{MANIFEST} is unreadable ({type(exc).__name__})"

    def check() -> str | None:
        fs, root = filesystem_for(uri)
        root = root.rstrip("/")
        found = _identities(fs, root, sorted(listed), remote="://" in uri and not uri.startswith("file://"))
        for name in sorted(listed):
            record = listed[name]
            if found[name] is None:
                return f"{name} is missing"
            size, identity = found[name]
            if size != sizes[name]:
                return f"{name} has {size} bytes, its manifest records {sizes[name]}"
            token, memo = _verified_record((*identity, record["sha256"]))
            if token in _verified_here or memo.exists():
                _verified_here.add(token)
                continue
            if file_digest(join(uri, name)).hex() != record["sha256"]:
                return f"{name} does not match the sha256 its manifest records"
            _remember_verified(token, memo)
        return None

    return retrying(uri, check) if listed else None


def _remember_verified(token: str, memo: Path) -> None:
    _verified_here.add(token)
    with contextlib.suppress(OSError):  # a read-only home only costs a hash in the next process
        memo.parent.mkdir(parents=True, exist_ok=True)
        memo.touch()


def artifact_uris(root: str) -> list[str]:
    """Every artifact folder under a store root that holds a manifest: `<root>/<kind>/<key>` and the committed
    checkpoints nested in resumable stages' folders."""
    def listing() -> list[str]:
        fs, path = filesystem_for(root)
        prefix = "" if not root.startswith(("s3://", "memory://")) else root.split("://", 1)[0] + "://"
        return sorted(prefix + m[: -len(MANIFEST) - 1] for m in fs.find(path.rstrip("/"))
                      if m.endswith(f"/{MANIFEST}"))

    return retrying(root, listing)


def verify_store(uri: str | None = None) -> dict:
    """Check one artifact (a folder with a manifest) or every artifact of a store (default: SFTCURATE_STORE):
    {"checked": n, "damaged": {uri: what is wrong}}. Damaged artifacts are reported, not removed: the next run
    that needs one rebuilds it."""
    uri = (uri or load_settings().store_uri).rstrip("/")
    uris = [uri] if is_committed(uri) else artifact_uris(uri)
    if not uris and not exists(uri):
        raise ContractError(f"{uri}: no such store or artifact; pass a store root or an artifact folder")
    damaged = {}
    for artifact in uris:
        damage = artifact_damage(artifact)
        if damage:
            damaged[artifact] = damage
    return {"checked": len(uris), "damaged": damaged}
