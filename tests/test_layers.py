"""The house: one import root, layers that import only to their left, no import cycles, a Prefect-free
library, and an installed distribution that exposes `sftcurate` alone."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from sftcurate.infra.hashing import first_party_imports, module_source

REPO = Path(__file__).resolve().parents[1]
# layer folder -> (import prefix, rank); a module may import its own layer and those of lower rank only
LAYERS = {
    "data_contracts": ("sftcurate.data_contracts", 0),
    "infra": ("sftcurate.infra", 1),
    "core": ("sftcurate.core", 2),
    "tasks": ("sftcurate.tasks", 3),
    "flows": ("sftcurate.flows", 4),
    "sftcurate": ("sftcurate", 5),  # the CLI
}


def layer_of(module: str) -> int:
    for prefix, rank in sorted(LAYERS.values(), key=lambda pr: -len(pr[0])):
        if module == prefix or module.startswith(prefix + "."):
            return rank
    raise AssertionError(module)


def all_modules() -> list[str]:
    out = []
    for folder, (prefix, _) in LAYERS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            rel = path.relative_to(REPO / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out.append(".".join([prefix, *parts]))
    return out


def test_every_module_imports_only_its_own_layer_or_layers_to_its_left():
    bad = [f"{m} -> {dep}" for m in all_modules() for dep in first_party_imports(m)
           if dep != "sftcurate" and layer_of(dep) > layer_of(m)]
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_no_import_cycles():
    graph = {m: set(first_party_imports(m)) for m in all_modules()}
    done, path = set(), []

    def visit(node):
        if node in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(node):] + [node]))
        if node in done:
            return
        path.append(node)
        for dep in graph.get(node, ()):
            if not (node.startswith(dep + ".") and dep in graph):  # a module importing its own package is fine
                visit(dep)
        path.pop()
        done.add(node)

    for module in graph:
        visit(module)


def test_the_library_and_everything_left_of_it_never_import_prefect():
    allowed = {"sftcurate.infra.runners", "sftcurate.infra.services"}  # task runners and the local stack
    offenders = []
    for module in all_modules():
        if layer_of(module) > LAYERS["core"][1] or module in allowed:
            continue
        for node in ast.walk(ast.parse(module_source(module))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{module} imports {n}" for n in names if n.split(".")[0] in ("prefect", "prefect_dask")]
    assert not offenders, offenders


def test_importing_the_package_touches_no_file_system(tmp_path):
    home = tmp_path / "home"
    env = {**os.environ, "SFTCURATE_HOME": str(home)}
    code = "import sftcurate, sftcurate.core.config, sftcurate.infra.store, sftcurate.flows.curate, sftcurate.cli"
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True, timeout=300)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_the_installed_distribution_exposes_one_import_root(tmp_path):
    """Build the wheel, install it alone into a folder, and use it from another directory."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), str(REPO)], check=True, timeout=600)
    wheel = next(wheels.glob("sftcurate-*.whl"))
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist() if "/" in name}
    assert {t for t in tops if not t.endswith((".dist-info", ".data"))} == {"sftcurate"}

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, timeout=600)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target), "SFTCURATE_HOME": str(elsewhere / ".sftcurate")}
    for generic in ("tasks", "flows", "infra", "data_contracts", "core"):
        probe = subprocess.run([sys.executable, "-c", f"import {generic}"], cwd=elsewhere, env=env,
                               capture_output=True, text=True, timeout=120)
        assert probe.returncode != 0 and "No module named" in probe.stderr, generic
    where = subprocess.run([sys.executable, "-c", "import sftcurate.flows.curate as m; print(m.__file__)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300, check=True)
    assert where.stdout.strip().startswith(str(target))
    config = elsewhere / "run.yaml"
    config.write_text("name: installed\nsource: {uri: 'builtin:python-docs', limit: 40}\n"
                      "selection: {method: uniform, budget: 5}\nmodels: {target: tiny-gpt2, max_length: 64}\n")
    run = subprocess.run([sys.executable, "-c", "from sftcurate.cli import app; app()", "run", str(config)],
                         cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "selection_uri" in run.stdout


def _attribute_and_call_names(module: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(module_source(module))):
        if isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.Name):
            names.add(node.id)
    return names


# the one place that imports a module by a name it is given: a user's own answer check, named in the config
IMPORTS_BY_NAME = {"sftcurate.core.answers"}


def test_modules_are_imported_by_import_statements_except_in_one_named_place():
    """Readers and tools (the code keys, the layer rules above) see every import; importlib's import_module
    and __import__ would hide one."""
    offenders = [m for m in all_modules() if m not in IMPORTS_BY_NAME
                 and {"import_module", "__import__"} & _attribute_and_call_names(m)]
    assert not offenders, offenders


def test_no_code_reads_stack_frames():
    """Messages are built from values: a renamed local variable must never change what a user reads."""
    frames = {"f_locals", "f_back", "tb_frame", "_getframe", "currentframe"}
    offenders = [f"{m}: {sorted(frames & _attribute_and_call_names(m))}" for m in all_modules()
                 if frames & _attribute_and_call_names(m)]
    assert not offenders, offenders


# Function-local imports of first-party modules that remain, per module: each defers a heavy library on purpose
# (torch, transformers, Prefect, pyarrow in the CLI, aiobotocore for s3:// in the store: see docs/ARCHITECTURE.md,
# "Imports"). A new one needs a reason and a line here; the counts only fall.
LOCAL_FIRST_PARTY_IMPORTS = {
    "sftcurate.infra.store": 1, "sftcurate.core.locate": 1, "sftcurate.cli": 9, "sftcurate.selectcli": 2,
}
DEFERRED = "deferred on purpose"


def _local_imports(module: str) -> list[tuple[ast.stmt, bool]]:
    """(import statement, whether it says why it is deferred) for every import inside a function: the reason on
    its line or in the comment right above it, or an earlier deferred import of the same package in the function
    (`import matplotlib  # deferred on purpose: ...` covers `import matplotlib.pyplot` after it)."""
    lines = module_source(module).splitlines()
    out = []
    for fn in ast.walk(ast.parse(module_source(module))):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        covered: set[str] = set()
        for node in sorted((n for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))),
                           key=lambda n: n.lineno):
            packages = {(a.name if isinstance(node, ast.Import) else node.module or "").split(".")[0]
                        for a in node.names}
            above = lines[node.lineno - 2].strip() if node.lineno > 1 else ""
            said = DEFERRED in lines[node.lineno - 1] or (above.startswith("#") and DEFERRED in above)
            if said:
                covered |= packages
            out.append((node, said or packages <= covered))
    return out


def _local_first_party_imports(module: str) -> int:
    return len({id(node) for node, _ in _local_imports(module)
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sftcurate")
                or isinstance(node, ast.Import) and any(a.name.startswith("sftcurate") for a in node.names)})


def test_first_party_modules_are_imported_at_the_top_but_for_the_listed_deferrals():
    counts = {m: n for m in all_modules() if (n := _local_first_party_imports(m))}
    grown = {m: (n, LOCAL_FIRST_PARTY_IMPORTS.get(m, 0)) for m, n in counts.items()
             if n > LOCAL_FIRST_PARTY_IMPORTS.get(m, 0)}
    assert not grown, f"function-local first-party imports (found, allowed): {grown}"
    assert sum(counts.values()) <= sum(LOCAL_FIRST_PARTY_IMPORTS.values()) == 13


def test_every_function_local_import_says_which_heavy_or_optional_library_it_defers():
    """Imports sit at the top; one inside a function defers a heavy or optional library and says so in one line
    ("# deferred on purpose: <what>, <when it is needed>"), so a reader knows it is not an oversight."""
    unexplained = [f"{m}:{node.lineno}" for m in all_modules() for node, said in _local_imports(m) if not said]
    assert not unexplained, unexplained
