"""Getting the curated data out: the user's records come back exactly as they were, in every format."""
from __future__ import annotations

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sftcurate.core.config import CurateConfig
from sftcurate.core.export import export
from sftcurate.core.ingest import examples_meta
from sftcurate.flows.curate import select_pipeline
from sftcurate.infra.store import read_bytes

N = 24


def plain(i):
    return {"text": f"Passage {i} about Python lists and how they grow when items are appended to them."}


def alpaca(i):
    return {"instruction": f"Explain item {i}", "input": "" if i % 2 else f"context {i}",
            "output": f"Item {i} is explained here in detail.", "category": ["a", "b", "c"][i % 3], "meta": {"k": i}}


def sharegpt(i):
    return {"conversations": [{"from": "system", "value": "You are terse."},
                              {"from": "human", "value": f"Hi {i}"}, {"from": "gpt", "value": f"Hello {i}."},
                              {"from": "human", "value": f"More {i}?"}, {"from": "gpt", "value": f"Sure, {i}."}],
            "id": f"conv-{i}"}


def messages(i):
    return {"messages": [{"role": "system", "content": "Be precise."}, {"role": "user", "content": f"Q{i}"},
                         {"role": "assistant", "content": f"A{i} first."}, {"role": "user", "content": f"Q{i} again"},
                         {"role": "assistant", "content": f"A{i} second."}], "source_tag": "chat"}


def write(tmp_path, kind: str, records: list[dict]) -> str:
    if kind == "csv":
        path = tmp_path / "data.csv"
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(records[0]))
            w.writeheader()
            w.writerows(records)
    elif kind == "parquet":
        path = tmp_path / "data.parquet"
        pq.write_table(pa.Table.from_pylist(records), path)
    else:
        path = tmp_path / "data.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def curate_all(uri: str, **source) -> str:
    cfg = CurateConfig.model_validate({"source": {"uri": uri, "heldout_fraction": 0.0, **source},
                                       "selection": {"method": "uniform", "budget": N, "seed": 3},
                                       "models": {"target": "tiny-gpt2", "max_length": 64}})
    examples_uri, selection_uri = select_pipeline(cfg, None)
    assert examples_meta(examples_uri)["n_train"] == N
    return selection_uri


@pytest.mark.parametrize("kind,make", [
    ("jsonl", plain), ("jsonl", alpaca), ("jsonl", sharegpt), ("jsonl", messages),
    ("csv", lambda i: {"question": f"Q {i}?", "answer": f"A {i}.", "topic": f"t{i % 4}"}),
    ("parquet", lambda i: {"prompt": f"P {i}", "response": f"R {i}", "score": i / 10, "tags": ["x", str(i)]}),
])
def test_exported_records_equal_the_originals_field_for_field(tmp_path, store_root, kind, make):
    originals = [make(i) for i in range(N)]
    columns = {"prompt": "question", "response": "answer"} if kind == "csv" else {}
    if kind == "csv":
        originals = [{k: str(v) for k, v in r.items()} for r in originals]
    selection = curate_all(write(tmp_path, kind, originals), columns=columns)
    result = export(selection, str(tmp_path / "out.jsonl"))
    got = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert result["records"] == N and sorted(map(json.dumps, got)) == sorted(map(json.dumps, originals))
    assert all(list(g) == list(next(o for o in originals if o == g)) for g in got)  # field order kept too
    export(selection, str(tmp_path / "out.parquet"), "parquet")
    assert pq.read_table(tmp_path / "out.parquet").to_pylist() == got


def test_messages_keep_every_turn_and_the_system_message_and_datasets_load(tmp_path, store_root):
    import datasets

    selection = curate_all(write(tmp_path, "jsonl", [sharegpt(i) for i in range(N)]))
    export(selection, str(tmp_path / "m.jsonl"), "messages")
    rows = [json.loads(line)["messages"] for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert all([m["role"] for m in r] == ["system", "user", "assistant", "user", "assistant"] for r in rows)
    assert {r[1]["content"] for r in rows} == {f"Hi {i}" for i in range(N)}
    export(selection, str(tmp_path / "hf"), "hf")
    loaded = datasets.load_from_disk(str(tmp_path / "hf"))
    assert loaded.num_rows == N and set(loaded.column_names) == {"conversations", "id"}
    alpaca_sel = curate_all(write(tmp_path, "jsonl", [alpaca(i) for i in range(N)]))
    export(alpaca_sel, str(tmp_path / "a.jsonl"), "messages")
    first = json.loads((tmp_path / "a.jsonl").read_text().splitlines()[0])["messages"]
    assert [m["role"] for m in first] == ["user", "assistant"] and first[1]["content"].startswith("Item ")


def test_export_to_s3(tmp_path, s3_store):
    selection = curate_all(write(tmp_path, "jsonl", [alpaca(i) for i in range(N)]))
    out = s3_store.replace("/sftcurate", "/exports/curated.jsonl")
    assert export(selection, out)["records"] == N
    lines = read_bytes(out).decode().splitlines()
    assert sorted(lines) == sorted(json.dumps(alpaca(i)) for i in range(N))


def test_seeded_sample_covers_a_file_sorted_by_category(tmp_path, store_root):
    from sftcurate.core.ingest import load_examples

    records = [{"prompt": f"q {c} {i}", "response": f"a {c} {i}", "cat": c} for c in "abcdefgh" for i in range(20)]
    uri = write(tmp_path, "jsonl", records)

    def groups(**source):
        cfg = CurateConfig.model_validate({"source": {"uri": uri, "heldout_fraction": 0.0, "group_field": "cat",
                                                      **source}, "selection": {"method": "uniform", "budget": 5},
                                           "models": {"target": "tiny-gpt2", "max_length": 64}})
        examples_uri, _ = select_pipeline(cfg, None)
        return load_examples(examples_uri).column("group").to_pylist()

    assert set(groups(limit=40)) == {"a", "b"}                     # the first N of a sorted file: 2 of 8 groups
    sampled = groups(sample=40)
    assert len(sampled) == 40 and len(set(sampled)) == 8           # a seeded sample: every group
    assert groups(sample=40) == sampled and groups(sample=40, sample_seed=1) != sampled
