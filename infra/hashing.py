"""Content keys: the basis of every artifact key.

`fingerprint(...)` hashes JSON-able parts (pydantic models by their JSON dump). `code_key(module)` hashes the
source of a module and of every first-party module it imports, directly or through others, found by reading
the import statements (function-local ones included). No list of "modules this stage depends on" is kept by
hand, so an edit anywhere a stage can reach changes that stage's key and nothing else's.
"""
from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
from functools import lru_cache

from pydantic import BaseModel

ROOT_PACKAGE = "sftcurate"


def _jsonable(obj):
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    return str(obj)


def fingerprint(*parts) -> str:
    """Stable sha256 (hex, 16 chars) of JSON-able parts."""
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, bytes):
            h.update(p)
        else:
            h.update(json.dumps(p, sort_keys=True, default=_jsonable).encode())
        h.update(b"\x00")
    return h.hexdigest()[:16]


@lru_cache(maxsize=None)
def module_source(name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        raise ModuleNotFoundError(f"no Python source for module {name}")
    with open(spec.origin, encoding="utf-8") as f:
        return f.read()


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ModuleNotFoundError, ValueError):  # `pkg.module.attribute`: the parent is a module, not a package
        return False


@lru_cache(maxsize=None)
def first_party_imports(name: str) -> tuple[str, ...]:
    """First-party modules that `name` imports anywhere in its source (`from a.b import c` gives a.b, and
    a.b.c when c is a module)."""
    package = name if module_source_is_package(name) else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(module_source(name))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            candidates = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for candidate in candidates:
            if (candidate == ROOT_PACKAGE or candidate.startswith(ROOT_PACKAGE + ".")) and _is_module(candidate):
                found.add(candidate)
    found.discard(name)
    return tuple(sorted(found))


def module_source_is_package(name: str) -> bool:
    spec = importlib.util.find_spec(name)
    return bool(spec and spec.submodule_search_locations is not None)


@lru_cache(maxsize=None)
def code_closure(name: str) -> tuple[str, ...]:
    """`name` and every first-party module reachable from it through imports."""
    seen, todo = {name}, [name]
    while todo:
        for dep in first_party_imports(todo.pop()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return tuple(sorted(seen))


@lru_cache(maxsize=None)
def code_key(name: str) -> str:
    """Fingerprint of the source of `name` and of its whole first-party import closure."""
    h = hashlib.sha256()
    for module in code_closure(name):
        h.update(module.encode() + b"\x00" + module_source(module).encode() + b"\x00")
    return h.hexdigest()[:16]


def forget_code_keys() -> None:
    """Drop the memoised sources and keys (tests that edit code in place call this)."""
    for cached in (module_source, first_party_imports, code_closure, code_key):
        getattr(cached, "cache_clear", lambda: None)()  # a test may have replaced module_source
