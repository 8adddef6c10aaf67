"""Content fingerprints: the basis of artifact keys and cross-run cache keys."""
from __future__ import annotations

import hashlib
import importlib
import inspect
import json
from functools import lru_cache


def fingerprint(*parts) -> str:
    """Stable sha256 (hex, 16 chars) of JSON-able parts."""
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, bytes):
            h.update(p)
        else:
            h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\x00")
    return h.hexdigest()[:16]


@lru_cache(maxsize=None)
def code_fingerprint(*modules: str) -> str:
    """Fingerprint of the source of the named modules, so a code change invalidates the artifacts it made."""
    h = hashlib.sha256()
    for name in sorted(modules):
        h.update(inspect.getsource(importlib.import_module(name)).encode())
    return h.hexdigest()[:16]
