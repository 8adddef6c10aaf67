"""Typed manifest meta (data_contracts.manifests): checked when an artifact is committed and when it is read;
readers get attributes."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from sftcurate.core.config import CurateConfig
from sftcurate.data_contracts import ContractError
from sftcurate.data_contracts.manifests import CuratedMeta, ExamplesMeta, GateMeta, ManifestMeta, SelectionMeta
from sftcurate.infra.hashing import module_source
from sftcurate.infra.stages import build_once, read_meta
from sftcurate.infra.store import MANIFEST, is_committed, join, read_manifest

from tests.test_layers import all_modules

CURATED = {"records": 3, "selection_uri": "file:///s/selection/k", "examples_uri": "file:///s/examples/k"}


def test_a_curation_reads_back_as_typed_meta(store_root):
    from sftcurate.core.ingest import examples_meta
    from sftcurate.core.selection import load_selection, selection_meta
    from sftcurate.flows.curate import select_pipeline

    cfg = CurateConfig.model_validate({
        "source": {"uri": "builtin:python-docs", "limit": 30, "passage_chars": 150},
        "selection": {"method": "uniform", "budget": 5, "seed": 3}, "models": {"max_length": 64}})
    examples_uri, uri = select_pipeline(cfg, None)
    meta = selection_meta(uri)
    table, loaded = load_selection(uri)
    assert (meta.method, meta.budget, meta.seed, meta.selected) == ("uniform", 5, 3, table.num_rows)
    assert meta.selected_tokens == sum(table.column("tokens").to_pylist()) and loaded == meta
    examples = examples_meta(examples_uri)
    assert isinstance(examples, ExamplesMeta) and examples.n_train == meta.pool_size and examples.gate_uri is None
    # validating before the write changed no value: the manifest holds what the stage wrote, and an ungated pool
    # no gate field
    raw = read_manifest(examples_uri)["meta"]
    assert "gate_uri" not in raw and ExamplesMeta.model_validate(raw).model_dump(exclude_unset=True) == raw


def test_a_renamed_or_missing_key_is_refused_at_the_write_in_one_line(store_root):
    def renamed(writer) -> None:
        writer.write_bytes("x.bin", b"x")
        writer.meta.update({**CURATED, "record": 3})
        del writer.meta["records"]

    with pytest.raises(ValueError) as err:
        build_once("curated", "sftcurate.core.export", {"test": "renamed"}, renamed, meta=CuratedMeta)
    assert str(err.value) == ("curated: manifest meta field 'records': Field required; field 'record': Extra inputs "
                              "are not permitted (CuratedMeta)")
    with pytest.raises(ValueError, match="field 'records': Field required") as err:
        build_once("curated", "sftcurate.core.export", {"test": "missing"},
                   lambda writer: writer.meta.update({k: v for k, v in CURATED.items() if k != "records"}),
                   meta=CuratedMeta)
    assert "\n" not in str(err.value)
    assert not list(Path(store_root).glob(f"curated/*/{MANIFEST}"))  # nothing committed
    with pytest.raises(ValueError, match="a curated artifact committed with GateMeta"):
        build_once("curated", "sftcurate.core.export", {"test": "kind"}, lambda writer: None, meta=GateMeta)


def test_a_read_gives_attributes_and_an_old_meta_says_rebuild_in_one_line(store_root):
    uri = build_once("curated", "sftcurate.core.export", {"test": "typed"},
                     lambda writer: writer.meta.update(CURATED), meta=CuratedMeta)
    meta = read_meta(uri, CuratedMeta)
    assert (meta.records, meta.selection_uri) == (3, CURATED["selection_uri"])
    assert read_manifest(uri)["meta"] == CURATED  # the bytes written are the stage's own values

    old = build_once("curated", "sftcurate.core.export", {"test": "old"},  # as an older version committed it
                     lambda writer: writer.meta.update({"rows": 3, "selection_uri": CURATED["selection_uri"]}))
    assert is_committed(old)
    with pytest.raises(ContractError) as err:
        read_meta(old, CuratedMeta)
    message = str(err.value)
    assert message.startswith(f"{old}: manifest meta field 'records': Field required; field 'examples_uri': "
                              "Field required; field 'rows': Extra inputs are not permitted (CuratedMeta)")
    assert "rebuild it" in message and "\n" not in message
    with pytest.raises(ContractError, match="a curated artifact where a selection artifact was expected"):
        read_meta(uri, SelectionMeta)


def test_every_stage_of_the_library_commits_typed_meta():
    """A stage that writes meta without its kind's model would let a renamed key through to its readers."""
    untyped = []
    for module in all_modules():
        if not module.startswith("sftcurate.core."):
            continue
        for node in ast.walk(ast.parse(module_source(module))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "build_once" and \
                    not any(k.arg in ("meta", None) for k in node.keywords):
                untyped.append(f"{module}:{node.lineno}")
    assert not untyped, untyped


def test_every_meta_model_names_its_own_kind():
    kinds = [model.kind for model in ManifestMeta.__subclasses__()]
    assert len(kinds) == len(set(kinds)) >= 16 and all(kinds)


def test_a_manifest_read_back_from_disk_is_the_model_dumped(store_root):
    uri = build_once("gate", "sftcurate.core.gate_scores", {"test": "floats"}, lambda writer: writer.meta.update({
        "score": "askllm", "drop": 0.25, "pool_size": 4, "dropped": 1, "kept": 3, "examples_key": "k",
        "threshold": None, "score_quantiles": {"0.5": 0.5}}), meta=GateMeta)
    on_disk = json.loads(Path(join(uri, MANIFEST).removeprefix("file://")).read_text())["meta"]
    assert on_disk == read_meta(uri, GateMeta).model_dump()
