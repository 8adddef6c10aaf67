"""Typed manifest meta (data_contracts.manifests): checked when an artifact is committed and when it is read;
readers get attributes."""
from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from sftcurate.core.config import CurateConfig
from sftcurate.data_contracts import ContractError
from sftcurate.data_contracts.manifests import SelectionMeta
from sftcurate.infra.stages import build_once, read_meta
from sftcurate.infra.store import is_committed


def test_a_selection_reads_back_as_typed_meta(store_root):
    from sftcurate.core.selection import load_selection, selection_meta
    from sftcurate.flows.curate import select_pipeline

    cfg = CurateConfig.model_validate({
        "source": {"uri": "builtin:python-docs", "limit": 30, "passage_chars": 150},
        "selection": {"method": "uniform", "budget": 5, "seed": 3}, "models": {"max_length": 64}})
    _, uri = select_pipeline(cfg, None)
    meta = selection_meta(uri)
    table, as_dict = load_selection(uri)
    assert (meta.method, meta.budget, meta.seed, meta.selected) == ("uniform", 5, 3, table.num_rows)
    assert meta.selected_tokens == sum(table.column("tokens").to_pylist()) and as_dict == meta.model_dump()


def test_meta_a_kind_does_not_declare_is_refused_before_the_manifest_is_written(store_root):
    def build(writer) -> None:
        writer.write_bytes("x.bin", b"x")
        writer.meta.update({"method": "uniform", "selected_tokns": 3})  # a renamed key

    with pytest.raises(ValidationError, match="selected_tokns"):
        build_once("selection", "sftcurate.core.selection", {"test": "renamed"}, build, meta=SelectionMeta)
    assert not list(Path(store_root).glob("selection/*/_MANIFEST.json"))  # nothing committed
    committed = build_once("selection", "sftcurate.core.selection", {"test": "untyped"},
                           lambda writer: writer.meta.update({"method": "uniform"}))
    assert is_committed(committed)
    with pytest.raises(ContractError, match="manifest meta field 'budget': Field required"):
        read_meta(committed, SelectionMeta)
