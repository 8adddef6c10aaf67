"""The artifact store is the only cache: keys follow the code a stage really reaches, a missing artifact is
rebuilt (and only it and what depends on it), and nothing is ever unpickled from a results folder."""
from __future__ import annotations

import ast
import os
import pickle
import shutil
from pathlib import Path

import pytest

from sftcurate.core.config import CurateConfig, FinetuneConfig
from sftcurate.infra import hashing, progress
from sftcurate.infra.store import filesystem_for

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("data_contracts", "infra", "core", "tasks", "flows", "sftcurate")
TINY = "tiny-gpt2"
SELECTORS = ("uniform", "fishersft", "s2l", "density", "askllm")


def small_config(method: str, **selection) -> CurateConfig:
    return CurateConfig.model_validate({
        "name": f"cache-{method}", "source": {"uri": "builtin:python-docs", "limit": 60, "passage_chars": 150},
        "selection": {"method": method, "budget": 8, "seed": 1, **selection},
        "models": {"target": TINY, "proxy": TINY, "max_length": 64},
        "embedding": {"shard_size": 20, "batch_tokens": 1024},
        "proxy": {"steps": 8, "checkpoints": 2, "batch_size": 8, "shard_size": 20},
    })


class Events:
    """Artifacts reused and built while the block runs, by kind."""

    def __init__(self):
        self.built: list[str] = []
        self.reused: list[str] = []

    def __enter__(self):
        def listen(name: str, event: str, detail: dict) -> None:
            if event in ("built", "reused"):
                getattr(self, event).append(name)

        self._unsubscribe = progress.subscribe(listen)
        return self

    def __exit__(self, *exc):
        self._unsubscribe()


def manifests(root: str) -> set[str]:
    """Every committed artifact folder under the store, relative to it."""
    fs, path = filesystem_for(root)
    return {p[len(path):].rsplit("/", 1)[0] for p in fs.find(path) if p.endswith("_MANIFEST.json")}


def picks(selection_uri: str) -> list[str]:
    from sftcurate.core.selection import load_selection

    return load_selection(selection_uri)[0].column("id").to_pylist()


def curate_once(cfg: CurateConfig) -> tuple[str, Events]:
    from sftcurate.flows.curate import select_pipeline

    with Events() as events:
        _, selection_uri = select_pipeline(cfg, None)
    return selection_uri, events


@pytest.mark.parametrize("method", SELECTORS)
def test_wiped_store_deleted_shard_and_deleted_final_artifact_are_rebuilt(method, store_root):
    cfg = small_config(method)
    first, events = curate_once(cfg)
    before, chosen = manifests(store_root), picks(first)
    assert events.built and not events.reused

    again, events = curate_once(cfg)  # everything committed: nothing is built
    assert again == first and not events.built

    shutil.rmtree(store_root)  # the whole store
    again, events = curate_once(cfg)
    assert again == first and manifests(store_root) == before and not events.reused
    assert picks(again) == chosen

    shard_kind = {"fishersft": "token_features_shard", "density": "token_features_shard",
                  "s2l": "trajectory_shard"}.get(method)
    final_kind = {"fishersft": "token_features", "density": "token_features", "s2l": "trajectories"}.get(method)
    if shard_kind:
        # one shard and the final artifact gone: exactly those two are rebuilt, under the same keys
        shard = next(k for k in before if k.startswith(f"/{shard_kind}/"))
        final = next(k for k in before if k.startswith(f"/{final_kind}/"))
        shutil.rmtree(store_root + shard)
        shutil.rmtree(store_root + final)
        again, events = curate_once(cfg)
        assert again == first and manifests(store_root) == before
        assert sorted(events.built) == sorted([shard_kind, final_kind])
        # the final artifact alone gone, then a new budget: the new selection is built on a rebuilt input
        shutil.rmtree(store_root + final)
        other, events = curate_once(small_config(method, budget=5))
        assert other != first and set(events.built) == {final_kind, "selection"}
    else:
        selection = next(k for k in before if k.startswith("/selection/"))
        shutil.rmtree(store_root + selection)
        again, events = curate_once(cfg)
        assert again == first and events.built == ["selection"]


# one line of the training loss (`core.training.token_loss_sum`), edited so that it computes something else
LOSS_EDIT = ("return loss, int((target != -100).sum())", "return loss * 2, int((target != -100).sum())")


def all_modules() -> list[str]:
    names = []
    for layer in LAYERS:
        for path in sorted((REPO / layer).rglob("*.py")):
            parts = [p for p in path.relative_to(REPO).with_suffix("").parts if p != "__init__"]
            names.append("sftcurate" if parts == ["sftcurate"] else
                         ".".join(parts) if parts[0] == "sftcurate" else ".".join(["sftcurate", *parts]))
    return names


def stage_codes() -> dict[str, tuple[str, ...]]:
    """The code of every stage: each module that calls build_once, and each selector's selection (its module,
    core.selection and the loaders of its requirements, as `core.selection.run_selection` keys it)."""
    from sftcurate.core.requirements import loader_code
    from sftcurate.core.selectors import REGISTRY

    codes = {m: (m,) for m in all_modules()
             if "build_once(" in hashing.module_source(m) and not m.endswith(("infra.stages", "core.selection"))}
    for name, cls in REGISTRY.items():
        if not cls.__module__.startswith("sftcurate."):  # a test's own selector, registered by an earlier test
            continue
        codes[f"selection:{name}"] = ("sftcurate.core.selection", cls.__module__, *loader_code(cls.requires))
    return codes


def reworded(source: str) -> str:
    """The same code in other prose: every docstring rewritten, a comment above every function, a blank line and
    a comment at the top."""
    lines = source.splitlines(keepends=True)
    edits = []  # (line, column, end line, end column, text), applied bottom-up
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                doc = first.value
                edits.append((doc.lineno, doc.col_offset, doc.end_lineno, doc.end_col_offset,
                              '"""Prose the test rewrote:\n\n    nothing in it is code."""'))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            edits.append((node.lineno, 0, node.lineno, 0, " " * node.col_offset + "# a comment the test added\n"))
    for line, col, end_line, end_col, text in sorted(edits, reverse=True):
        head = "".join(lines[:line - 1]) + lines[line - 1][:col]
        tail = lines[end_line - 1][end_col:] + "".join(lines[end_line:])
        lines = (head + text + tail).splitlines(keepends=True)
    return "# a comment the test added\n\n" + "".join(lines)


def replaced_line(module: str, old: str, new: str):
    """`hashing.module_source` with one line of `module` replaced."""
    source = hashing.module_source

    def edited(name: str) -> str:
        text = source(name)
        if name == module:
            assert text.count(old) == 1, f"{module} no longer holds {old!r} once"
            text = text.replace(old, new)
        return text

    return edited


def code_keys(modules) -> dict[str, str]:
    hashing.forget_code_keys()
    return {m: hashing.code_key(m) for m in modules}


def stage_code_keys(codes: dict[str, tuple[str, ...]]) -> dict[str, list[str]]:
    hashing.forget_code_keys()
    return {stage: [hashing.code_key(c) for c in code] for stage, code in codes.items()}


def test_prose_edits_in_every_layer_move_no_code_key(monkeypatch):
    modules = all_modules()
    assert {"sftcurate.data_contracts.schemas", "sftcurate.infra.store", "sftcurate.core.config",
            "sftcurate.tasks.curate", "sftcurate.flows.compare", "sftcurate.cli"} <= set(modules)
    before = code_keys(modules)
    source = hashing.module_source
    edited = {m for m in modules if reworded(source(m)) != source(m)}
    assert len(edited) == len(modules)
    monkeypatch.setattr(hashing, "module_source", lambda name: reworded(source(name)))
    try:
        assert hashing.module_source("sftcurate.core.config") != source("sftcurate.core.config")
        after = code_keys(modules)
    finally:
        monkeypatch.undo()
        hashing.forget_code_keys()
    assert [m for m in modules if after[m] != before[m]] == []


@pytest.mark.parametrize("module, old, new, moved", [
    # the training loss reaches both trainers (the S2L proxy, the fine-tune), not the evaluation or selection
    ("sftcurate.core.training", *LOSS_EDIT, {"sftcurate.core.proxy", "sftcurate.core.finetune"}),
    # the per-example held-out loss reaches the evaluation only
    ("sftcurate.core.training", "return sums.index_add_(0, sel.nonzero()[:, 0], losses), sel.sum(dim=1)",
     "return sums.index_add_(0, sel.nonzero()[:, 0], losses * 2), sel.sum(dim=1)", {"sftcurate.core.evaluate"}),
    # the judge's settings model reaches the judge and the report that reads its verdicts, not ingest
    ("sftcurate.core.config", "n_bootstrap: int = Field(1000, gt=0)", "n_bootstrap: int = Field(999, gt=0)",
     {"sftcurate.core.judge", "sftcurate.core.report"}),
    # a selector's params model (in its own module) reaches that selector's selection only: not another
    # selector, not an input of a selection, not the comparison report whose config lists every selector's params
    ("sftcurate.core.selectors.s2l", 'clusters: int = Field(100, ge=1,', 'clusters: int = Field(99, ge=1,',
     {"selection:s2l"}),
    # how token features are made reaches the embedding stage, not a selection that reads them (the features'
    # own key covers it)
    ("sftcurate.core.embedding", "def embed_shard(", "def embed_shard(*_unused, ", {"sftcurate.core.embedding"}),
    # how trajectories are read into a selection reaches the selection that reads them, not the stage that
    # makes them
    ("sftcurate.core.inputs", 'check_pool_alignment(uri, ids, inputs.pool, "trajectories")',
     'check_pool_alignment(uri, list(ids), inputs.pool, "trajectories")', {"selection:s2l"}),
])
def test_one_code_line_moves_exactly_the_stages_that_reach_it(monkeypatch, module, old, new, moved):
    stages = stage_codes()
    assert {"sftcurate.core.ingest", "sftcurate.core.embedding", "sftcurate.core.finetune", "sftcurate.core.judge",
            "selection:uniform", "selection:s2l"} <= set(stages)
    before = stage_code_keys(stages)
    monkeypatch.setattr(hashing, "module_source", replaced_line(module, old, new))
    try:
        after = stage_code_keys(stages)
    finally:
        monkeypatch.undo()
        hashing.forget_code_keys()
    assert {stage for stage in stages if after[stage] != before[stage]} == moved


def test_a_transitively_reached_code_change_rebuilds_that_stage_and_its_dependents_only(store_root, monkeypatch):
    """Held-out evaluation reaches the training loss (core.training) through an import; editing it must rebuild
    the fine-tune and the evaluation, and leave ingest and selection reused."""
    from sftcurate.core.evaluate import evaluate_heldout
    from sftcurate.core.finetune import finetune
    from sftcurate.flows.curate import select_pipeline
    from sftcurate.infra.models import model_fingerprint

    cfg = small_config("uniform")
    ft = FinetuneConfig(steps=2, batch_size=4, max_length=64)

    def pipeline():
        with Events() as events:
            examples, selection = select_pipeline(cfg, None)
            model = finetune(examples, selection, TINY, model_fingerprint(TINY), ft)
            evaluate_heldout(examples, model, TINY, model_fingerprint(TINY), 64)
        return events

    assert sorted(pipeline().built) == ["examples", "finetuned", "heldout_eval", "selection"]
    assert pipeline().built == []

    monkeypatch.setattr(hashing, "module_source", replaced_line("sftcurate.core.training", *LOSS_EDIT))
    hashing.forget_code_keys()
    try:
        events = pipeline()
    finally:
        monkeypatch.undo()
        hashing.forget_code_keys()
    assert sorted(events.built) == ["finetuned", "heldout_eval"]
    assert sorted(events.reused) == ["examples", "selection"]


def test_no_task_caches_or_persists_results_and_a_planted_pickle_never_runs(prefect_harness, store_root, tmp_path):
    from prefect.cache_policies import NO_CACHE

    from sftcurate.flows.curate import curate
    from sftcurate.tasks import curate as curate_tasks, evaluate as evaluate_tasks

    from sftcurate.core.selectors.base import REQUIREMENTS

    steps = {step for r in REQUIREMENTS.values() if r.produce
             for step in (r.produce.prepare, r.produce.shard, r.produce.commit) if step}
    tasks = [obj for module in (curate_tasks, evaluate_tasks) for obj in vars(module).values()
             if hasattr(obj, "persist_result") and hasattr(obj, "cache_policy")]
    tasks += [curate_tasks.step_task(step) for step in steps]  # the producers' tasks, made from declarations
    assert len(tasks) >= 14
    assert all(t.persist_result is False and t.cache_policy is NO_CACHE for t in tasks)

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    home = Path(os.environ["SFTCURATE_HOME"])
    storage = Path(os.environ["PREFECT_HOME"]) / "storage"  # Prefect's default local result storage

    def stored() -> set[Path]:
        return {p for p in storage.rglob("*") if p.is_file()} if storage.exists() else set()

    # Prefect pickles the exception of a FAILED run there (written, never read back); a successful run must
    # leave nothing, and nothing planted where results would live may ever be loaded.
    planted = [home / "prefect-results" / "x", storage / "x"]
    for path in planted:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pickle.dumps(Payload()))
    before = stored()
    cfg = small_config("uniform")
    first = curate(cfg)
    second = curate(cfg)
    assert stored() == before, f"task results were persisted: {sorted(stored() - before)[:3]}"
    assert second["selection_uri"] == first["selection_uri"]
    assert not marker.exists()
