"""Local copies of remote files and folders, and the content keys that name them.

Every remote input that a library needs as a local path (a model folder on S3, a committed proxy checkpoint,
a token-feature shard) goes through `local_copy`: the copy is named by a key of its *content*, fetched under a
temporary name and renamed into place, so a crash or a racing worker never leaves a partial copy that a later
run trusts, and a changed remote never hands back the copy of what it held before.

Content keys also identify model weights in the artifact store's keys (`infra.models.model_fingerprint`):
a folder overwritten by a new fine-tune must not reuse features computed with the old weights. Hashing a
540 MB checkpoint takes about a second, so a file's hash is remembered under its (path, size, mtime, inode),
as git's index does.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from pathlib import Path
from typing import Callable

from sftcurate.infra.settings import load_settings
from sftcurate.infra.store import file_digest, filesystem_for, retrying

def file_sha256(path: Path) -> str:
    """sha256 of a local file's bytes, remembered per (path, size, mtime, inode) in the cache folder."""
    path = Path(path).resolve()
    st = path.stat()
    memo = load_settings().home / "cache" / "sha256" / hashlib.sha256(
        f"{path}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}".encode()).hexdigest()
    try:
        return memo.read_text().strip()
    except OSError:
        pass
    digest = file_digest(str(path)).hex()
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_name(f".{memo.name}.{os.getpid()}-{threading.get_ident()}")
    tmp.write_text(digest)
    os.replace(tmp, memo)
    return digest


def folder_key(folder: Path) -> str:
    """A key of a local folder's content: every file's relative path and sha256."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    listing = [(str(p.relative_to(folder)), file_sha256(p)) for p in files]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]


def remote_folder_key(uri: str) -> str:
    """A key of a remote folder's content from its listing: every object's relative path, size and ETag (S3
    changes an object's ETag whenever its bytes change), fetched through the storage retry loop."""
    def listing() -> list:
        fs, path = filesystem_for(uri)
        root = path.rstrip("/")
        found = fs.find(root, detail=True)
        return sorted((name[len(root):].lstrip("/"), int(info.get("size") or 0),
                       str(info.get("ETag") or info.get("etag") or info.get("mtime") or ""))
                      for name, info in found.items())

    entries = retrying(uri, listing)
    if not entries:
        raise FileNotFoundError(f"{uri}: no files there")
    return hashlib.sha256(json.dumps([uri, entries]).encode()).hexdigest()[:16]


def local_copy(uri: str, cache: Path, name: str, verify: Callable[[Path], None] | None = None,
               refresh: bool = False) -> Path:
    """`cache/name`, a local copy of the remote file or folder `uri`. `name` must key the content (a copy that
    exists is returned as is) unless `refresh` (fetched again, replacing the old copy). `verify(tmp)` may refuse
    the fetched bytes by raising; nothing is kept then."""
    target = Path(cache) / name
    if target.exists() and not refresh:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{name}.{os.getpid()}-{threading.get_ident()}.part")

    def fetch() -> None:
        _remove(tmp)
        fs, path = filesystem_for(uri)
        root = path.rstrip("/")
        if not fs.isdir(root):
            fs.get_file(root, str(tmp))
            return
        tmp.mkdir()
        for remote in fs.find(root):
            rel = remote[len(root):].lstrip("/")
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(remote, str(tmp / rel))

    try:
        retrying(uri, fetch)
        if verify is not None:
            verify(tmp)
        if tmp.is_dir():
            if refresh:
                _remove(target)
            try:
                tmp.rename(target)
            except OSError:  # another worker finished the same copy first
                if not target.exists():
                    raise
        else:
            os.replace(tmp, target)
    finally:
        _remove(tmp)
    return target


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
