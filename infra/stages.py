"""The one cache: a stage's artifact is built at most once per (inputs, code), and skip-if-done lives here only.

A stage is declared by what it makes (`kind`), the code that makes it (`code`: the module holding the build
function; its whole first-party import closure is hashed), its upstream artifacts (URIs; their content keys,
not their locations, enter the key) and its small typed parameters. A committed artifact with that key is
returned as it is; a missing one (never built, deleted, a wiped store) is built, committed manifest-last,
and returned. Nothing else caches: Prefect tasks around stages keep no results, so a stale result can never
come back from anywhere but a committed artifact whose key says it is current.
"""
from __future__ import annotations

import threading
from typing import Callable

from sftcurate.data_contracts.manifests import M, ManifestMeta, check_meta, meta_to_write
from sftcurate.infra import progress
from sftcurate.infra.hashing import code_key, fingerprint
from sftcurate.infra.store import ArtifactStore, ArtifactWriter, artifact_damage, read_manifest


class Built(str):
    """A stage's artifact URI (a plain `str` to every caller) that also says whether this call reused the
    committed artifact (True) or built it (False); the Prefect wrappers show it as the task's state."""

    reused: bool

    def __new__(cls, uri: str, reused: bool):
        built = super().__new__(cls, uri)
        built.reused = reused
        return built


def content_key(uri: str) -> str:
    """The key an upstream artifact contributes to a downstream key: its own key (its inputs' keys plus the code
    that built it, recursively). Not its bytes: a forward pass is not bit-reproducible across runs, and a key
    built from bytes would make a rebuilt input rename everything downstream of it."""
    return read_manifest(uri)["key"]


def _upstream_keys(upstream):
    if upstream is None:
        return None
    if isinstance(upstream, str):
        return content_key(upstream)
    if isinstance(upstream, (list, tuple)):
        return [_upstream_keys(u) for u in upstream]
    if isinstance(upstream, dict):
        return {k: _upstream_keys(v) for k, v in sorted(upstream.items())}
    raise TypeError(f"upstream artifacts are URIs (or lists/dicts of them), got {type(upstream).__name__}")


def stage_key(kind: str, code: str | tuple[str, ...], params: dict, upstream: dict | None = None) -> str:
    modules = (code,) if isinstance(code, str) else tuple(code)
    return fingerprint(kind, [code_key(m) for m in modules], params, _upstream_keys(upstream or {}))


# Two threads (mapped shards, concurrent cells) building the same key would write into one folder.
_building: dict[str, threading.Lock] = {}
_building_guard = threading.Lock()


def _lock_for(uri: str) -> threading.Lock:
    with _building_guard:
        return _building.setdefault(uri, threading.Lock())


def build_once(kind: str, code: str | tuple[str, ...], params: dict, build: Callable[[ArtifactWriter], None], *,
               upstream: dict | None = None, store_root: str | None = None, resumable: bool = False,
               meta: type[ManifestMeta] | None = None) -> Built:
    """Return the committed artifact for these inputs and this code, building it first when it is missing.

    `build(writer)` writes the files and `writer.meta`; the manifest is written after it returns. With
    `resumable`, a crashed attempt's files are kept for `build` to resume from (it must check what it finds);
    otherwise they are cleared first. With `meta` (the kind's `data_contracts.manifests` model), `writer.meta`
    is checked against it before the manifest is written (one line naming the field if it does not fit)."""
    store = ArtifactStore(store_root)
    key = stage_key(kind, code, params, upstream)
    uri = store.uri(kind, key)
    with _lock_for(uri):
        damage = None
        if store.committed(kind, key):
            damage = artifact_damage(uri)  # verified reads: a damaged artifact is rebuilt, never reused
            if damage is None:
                progress.artifact(kind, uri, reused=True)
                return Built(uri, True)
            progress.damaged(kind, uri, damage)
        writer = ArtifactWriter(uri=uri, kind=kind, key=key) if resumable and not damage else store.begin(kind, key)
        build(writer)
        if meta is not None:  # a stage writing meta its kind does not declare is a bug: a traceback
            writer.meta = meta_to_write(meta, kind, writer.meta)
        writer.commit()
    progress.artifact(kind, uri, reused=False)
    return Built(uri, False)


def read_meta(uri: str, meta: type[M]) -> M:
    """A committed artifact's manifest meta as its kind's typed model: one line if the artifact is of another
    kind, or was committed with a meta this version does not read (then: rebuild it)."""
    return check_meta(meta, read_manifest(uri), uri)
