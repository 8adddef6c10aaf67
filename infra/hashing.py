"""Content keys: the basis of every artifact key.

`fingerprint(...)` hashes JSON-able parts (pydantic models by their JSON dump). `code_key(module)` hashes the
code a stage can run: the whole of its own module, and, from every first-party module it imports (directly or
through others, function-local imports included), the top-level definitions it reaches by name. Each piece is
hashed as its syntax tree written back out (`ast.unparse`) with docstrings dropped, so comments, docstrings and
formatting never move a key, and an edit of a definition a stage cannot reach (the judge's settings model, for
ingest) moves no key of that stage. No list of "modules this stage depends on" is kept by hand.

What a name reaches: `from a import b` reaches `b`'s definition in `a` (all of module `a.b` when `b` is a
module); `import a.b` reaches all of `a.b`; a definition reaches every top-level name of its module that it
mentions. A statement that binds no name (a call, `x[k] = v`, `assert`) and a plain `import` of a first-party
module run for their effect when the module is imported, so they are part of every key that reaches the module.
"""
from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import sys
from dataclasses import dataclass
from functools import lru_cache
from importlib.machinery import ModuleSpec

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
def _spec(name: str) -> ModuleSpec | None:
    """Where module `name` lives, found without importing anything (importlib's `find_spec` imports a dotted
    name's parents, and a module edited half-way by someone else would then break a key)."""
    parent, _, _ = name.rpartition(".")
    if not parent:
        return importlib.util.find_spec(name)
    package = _spec(parent)
    if package is None or package.submodule_search_locations is None:
        return None  # `pkg.module.attribute`: the parent is a module, not a package
    for finder in sys.meta_path:  # what `import` asks (an editable install maps folders through its own finder)
        spec = finder.find_spec(name, list(package.submodule_search_locations)) \
            if hasattr(finder, "find_spec") else None
        if spec is not None:
            return spec
    return None


@lru_cache(maxsize=None)
def module_source(name: str) -> str:
    spec = _spec(name)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        raise ModuleNotFoundError(f"no Python source for module {name}")
    with open(spec.origin, encoding="utf-8") as f:
        return f.read()


def _is_module(name: str) -> bool:
    return _spec(name) is not None


def _first_party(name: str) -> bool:
    return (name == ROOT_PACKAGE or name.startswith(ROOT_PACKAGE + ".")) and _is_module(name)


def module_source_is_package(name: str) -> bool:
    spec = _spec(name)
    return bool(spec and spec.submodule_search_locations is not None)


def _import_base(node: ast.ImportFrom, module: str) -> str:
    """The absolute module a `from ... import` statement of `module` names (relative imports resolved)."""
    base = node.module or ""
    if node.level:
        package = module if module_source_is_package(module) else module.rpartition(".")[0]
        parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
        base = f"{parent}.{base}" if base else parent
    return base


@lru_cache(maxsize=None)
def first_party_imports(name: str) -> tuple[str, ...]:
    """First-party modules that `name` imports anywhere in its source (`from a.b import c` gives a.b, and
    a.b.c when c is a module): the module graph the layer rules check."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(module_source(name))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _import_base(node, name)
            candidates = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(c for c in candidates if _first_party(c))
    found.discard(name)
    return tuple(sorted(found))


# ---------------------------------------------------------------- code keys from definitions

WHOLE = None             # a reference to all of a module
EFFECTS = "<effects>"    # a reference to what importing a module runs, no definition (a package above a module)
Target = tuple           # (module, a name it binds, WHOLE or EFFECTS)


@dataclass(frozen=True)
class Unit:
    """One top-level statement of a module (one name of a `from ... import`), as the key sees it."""

    text: str                        # unparsed with docstrings dropped
    binds: frozenset[str]            # module-level names it defines
    mentions: frozenset[str]         # every name it mentions
    targets: tuple[Target, ...]      # first-party code its imports reach (nested ones included)
    always: bool                     # runs for its effect whenever the module is imported


def _drop_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def _bound_names(stmt: ast.stmt) -> set[str]:
    """Names a top-level statement binds in its module (inside if/try/with/for blocks too, not in functions)."""
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {stmt.name}
    if isinstance(stmt, (ast.Import, ast.ImportFrom)):
        return {(a.asname or a.name).split(".")[0] for a in stmt.names}
    targets = {ast.Assign: lambda s: s.targets, ast.AnnAssign: lambda s: [s.target],
               ast.AugAssign: lambda s: [s.target], ast.For: lambda s: [s.target]}
    names = set()
    for kind, get in targets.items():
        if isinstance(stmt, kind):
            for target in get(stmt):
                names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
    for block in ("body", "orelse", "finalbody", "handlers"):
        for child in getattr(stmt, block, []) or []:
            if isinstance(child, ast.ExceptHandler):
                names |= {n for c in child.body for n in _bound_names(c)}
            elif isinstance(child, ast.stmt):
                names |= _bound_names(child)
    return names


def _targets(node: ast.AST, module: str) -> list[Target]:
    """The first-party code every import inside `node` reaches."""
    found: list[Target] = []
    for sub in ast.walk(node):
        if isinstance(sub, ast.Import):
            found += [(a.name, WHOLE) for a in sub.names if _first_party(a.name)]
        elif isinstance(sub, ast.ImportFrom):
            base = _import_base(sub, module)
            for alias in sub.names:
                if alias.name == "*" or _first_party(f"{base}.{alias.name}"):
                    found.append((base if alias.name == "*" else f"{base}.{alias.name}", WHOLE))
                elif _first_party(base):
                    found.append((base, alias.name))
    return found


def _unit(stmt: ast.stmt, module: str) -> Unit:
    binds = frozenset(_bound_names(stmt))
    first_party_import = isinstance(stmt, ast.Import) and any(_first_party(a.name) for a in stmt.names)
    return Unit(text=ast.unparse(stmt), binds=binds,
                mentions=frozenset(n.id for n in ast.walk(stmt) if isinstance(n, ast.Name)),
                targets=tuple(_targets(stmt, module)), always=not binds or first_party_import)


@lru_cache(maxsize=None)
def module_units(name: str) -> tuple[Unit, ...]:
    """The module's top-level statements as key units; a `from ... import a, b` is one unit per name, so
    reaching `a` does not reach `b`."""
    units = []
    for stmt in _drop_docstrings(ast.parse(module_source(name))).body:
        if isinstance(stmt, ast.ImportFrom) and len(stmt.names) > 1:
            units += [_unit(ast.ImportFrom(module=stmt.module, names=[alias], level=stmt.level), name)
                      for alias in stmt.names]
        else:
            units.append(_unit(stmt, name))
    return tuple(units)


def _binders(name: str) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i, unit in enumerate(module_units(name)):
        for bound in unit.binds:
            out.setdefault(bound, []).append(i)
    return out


def _parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:k]) for k in range(1, len(parts))]


@lru_cache(maxsize=None)
def reached_units(name: str) -> tuple[tuple[str, int], ...]:
    """(module, unit index) of all of module `name` (or of definition `module:name`) and of every definition it
    reaches, sorted."""
    reached: set[tuple[str, int]] = set()
    seen: set[Target] = set()
    module, _, symbol = name.partition(":")
    todo: list[Target] = [(module, symbol.split(".")[0] or WHOLE)]
    while todo:
        target = todo.pop()
        if target in seen:
            continue
        seen.add(target)
        module, symbol = target
        units, binders = module_units(module), _binders(module)
        picked = {i for i, unit in enumerate(units) if unit.always}
        if symbol in binders:
            picked |= set(binders[symbol])
        elif symbol is not EFFECTS:  # the whole module, or a name it gets in a way not seen here (`import *`)
            picked = set(range(len(units)))
        todo += [(parent, EFFECTS) for parent in _parents(module)]  # a package runs before its modules
        for i in picked - {i for m, i in reached if m == module}:
            reached.add((module, i))
            unit = units[i]
            todo += [(module, n) for n in unit.mentions if n in binders]
            todo += list(unit.targets)
    return tuple(sorted(reached))


@lru_cache(maxsize=None)
def code_key(name: str) -> str:
    """Fingerprint of the code module `name` can run: all of it, and what it reaches elsewhere (see above). With
    `module:function`, the code that one definition can run."""
    # by text, not position: a definition added above another one does not move the keys that reach only the other
    pieces = sorted({(module, module_units(module)[i].text) for module, i in reached_units(name)})
    h = hashlib.sha256()
    for module, text in pieces:
        h.update(f"{module}\x00{text}\x00".encode())
    return h.hexdigest()[:16]


def forget_code_keys() -> None:
    """Drop the memoised sources and keys (tests that edit code in place call this)."""
    for cached in (_spec, module_source, first_party_imports, module_units, reached_units, code_key):
        getattr(cached, "cache_clear", lambda: None)()  # a test may have replaced module_source
