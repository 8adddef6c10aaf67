"""Data contracts are enforced on write and on read."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sftcurate.data_contracts import EXAMPLES, SELECTION, TOKEN_FEATURES, ContractError
from sftcurate.infra.store import ArtifactStore, is_committed, read_manifest, read_table, read_tensors, write_table


def selection(n=3):
    return pa.table({"index": list(range(n)), "rank": list(range(n)), "id": [str(i) for i in range(n)],
                     "tokens": [5] * n, "gain": [1.0] * n, "score": [None] * n, "cluster": [None] * n})


def test_write_then_read_roundtrip_with_version(tmp_path):
    path = str(tmp_path / "sel.parquet")
    write_table(path, selection(), SELECTION)
    table = read_table(path, SELECTION)
    assert table.schema.metadata[b"sftcurate.version"] == b"1" and table.num_rows == 3


def test_missing_column_wrong_type_nulls_and_wrong_kind(tmp_path):
    with pytest.raises(ContractError, match="missing column 'tokens'"):
        write_table(str(tmp_path / "a.parquet"), selection().drop(["tokens"]), SELECTION)
    bad = selection().set_column(3, "tokens", pa.array(["x", "y", "z"]))
    with pytest.raises(ContractError, match="column 'tokens' has type string"):
        write_table(str(tmp_path / "b.parquet"), bad, SELECTION)
    nulls = selection().set_column(2, "id", pa.array([None, "1", "2"], pa.string()))
    with pytest.raises(ContractError, match="'id' has 1 null"):
        write_table(str(tmp_path / "c.parquet"), nulls, SELECTION)
    write_table(str(tmp_path / "d.parquet"), selection(), SELECTION)
    with pytest.raises(ContractError, match="is a 'selection' artifact, expected 'examples'"):
        read_table(str(tmp_path / "d.parquet"), EXAMPLES)


def test_newer_schema_version_is_refused_on_read(tmp_path):
    table = selection().replace_schema_metadata({b"sftcurate.contract": b"selection", b"sftcurate.version": b"99"})
    pq.write_table(table, tmp_path / "v.parquet")
    with pytest.raises(ContractError, match="schema version 99"):
        read_table(str(tmp_path / "v.parquet"), SELECTION)


def test_artifact_is_committed_only_by_its_manifest(tmp_path):
    store = ArtifactStore(str(tmp_path))
    writer = store.begin("selection", "k1")
    writer.write_table("selection.parquet", selection(), SELECTION)
    assert not is_committed(writer.uri) and store.committed("selection", "k1") is None
    with pytest.raises(ContractError, match="never committed"):
        read_manifest(writer.uri)
    writer.commit()
    assert store.committed("selection", "k1") == writer.uri
    assert read_manifest(writer.uri)["files"]["selection.parquet"]["bytes"] > 0


def test_manifests_are_standard_json(tmp_path):
    import json

    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    writer = ArtifactStore(str(tmp_path)).begin("judgments", "k")
    writer.write_json("summary.json", {"win_rate": float("nan"), "ci": [float("inf"), 0.5]})
    writer.meta.update({"summary": {"win_rate": float("nan"), "wins": 3, "nested": [{"p": -float("inf")}]}})
    uri = writer.commit()
    for name in ("_MANIFEST.json", "summary.json"):
        json.loads((tmp_path / "judgments" / "k" / name).read_text(), parse_constant=refuse)
    assert read_manifest(uri)["meta"]["summary"] == {"win_rate": None, "wins": 3, "nested": [{"p": None}]}


def test_tensor_contract_checks(tmp_path):
    store = ArtifactStore(str(tmp_path))
    w = store.begin("token_features", "x")
    feats = np.ones((5, 4), np.float32)
    path = w.write_tensors("f.safetensors", {"features": feats, "offsets": np.array([0, 2, 5], np.int64)}, TOKEN_FEATURES)
    tensors, meta = read_tensors(path, TOKEN_FEATURES)
    assert meta["sftcurate.contract"] == "token_features" and tensors["features"].shape == (5, 4)
    with pytest.raises(ContractError, match="not monotone"):
        w.write_tensors("g.safetensors", {"features": feats, "offsets": np.array([0, 3, 2, 5], np.int64)}, TOKEN_FEATURES)
    feats[3, 1] = np.nan
    with pytest.raises(ContractError, match="row 3 .sentence 1. has NaN"):
        w.write_tensors("h.safetensors", {"features": feats, "offsets": np.array([0, 2, 5], np.int64)}, TOKEN_FEATURES)
