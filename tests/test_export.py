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
                                       # 128: every record fits whole (a longer one is exported as cut)
                                       "models": {"target": "tiny-gpt2", "max_length": 128}})
    examples_uri, selection_uri = select_pipeline(cfg, None)
    assert examples_meta(examples_uri).n_train == N
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


# ---------------------------------------------------------------- never lose the user's data (issue 28)

def test_export_refuses_an_existing_file_unless_told_and_never_replaces_a_source(tmp_path, store_root):
    from sftcurate.data_contracts import UserError

    source = write(tmp_path, "jsonl", [plain(i) for i in range(N)])
    source_bytes = (tmp_path / "data.jsonl").read_bytes()
    selection = curate_all(source)
    out = tmp_path / "train.jsonl"
    out.write_text("my earlier export\n")
    with pytest.raises(UserError, match="train.jsonl: already exists; pass --overwrite"):
        export(selection, str(out))
    assert out.read_text() == "my earlier export\n"
    export(selection, str(out), overwrite=True)
    assert len(out.read_text().splitlines()) == N
    for alias in (source, f"{tmp_path}/./data.jsonl"):
        with pytest.raises(UserError, match="a file the selection was curated from"):
            export(selection, alias, overwrite=True)
    link = tmp_path / "link.jsonl"
    link.symlink_to(tmp_path / "data.jsonl")
    with pytest.raises(UserError, match="a file the selection was curated from"):
        export(selection, str(link), overwrite=True)
    assert (tmp_path / "data.jsonl").read_bytes() == source_bytes
    with pytest.raises(UserError, match="is a folder; give a file path"):
        export(selection, str(tmp_path), overwrite=True)
    assert not list(tmp_path.glob(".*partial"))


def test_export_rewrites_an_hf_folder_whole_and_refuses_a_bad_format_before_committing(tmp_path, store_root):
    import datasets

    from sftcurate.data_contracts import UserError
    from tests.conftest import committed_manifests

    selection = curate_all(write(tmp_path, "jsonl", [alpaca(i) for i in range(N)]))
    export(selection, str(tmp_path / "hf"), "hf")
    with pytest.raises(UserError, match="already exists"):
        export(selection, str(tmp_path / "hf"), "hf")
    export(selection, str(tmp_path / "hf"), "hf", overwrite=True)
    assert datasets.load_from_disk(str(tmp_path / "hf")).num_rows == N
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "artifacts") == ["data.jsonl", "hf"]  # nothing left
    before = committed_manifests(store_root)
    with pytest.raises(UserError, match="--format xml"):
        export(selection, str(tmp_path / "x.xml"), "xml")
    assert committed_manifests(store_root) == before


def test_export_from_another_folder_leaves_no_store_there(tmp_path, store_root, monkeypatch):
    selection = curate_all(write(tmp_path, "jsonl", [plain(i) for i in range(N)]))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("SFTCURATE_STORE", raising=False)
    monkeypatch.delenv("SFTCURATE_HOME", raising=False)
    export(selection, "out.jsonl")
    assert sorted(p.name for p in elsewhere.iterdir()) == ["out.jsonl"]


@pytest.mark.parametrize("fmt", ["parquet", "hf"])
def test_a_field_of_mixed_types_is_one_line_naming_it_on_columnar_export(tmp_path, store_root, fmt):
    from sftcurate.data_contracts import UserError

    records = [{"prompt": f"q{i}", "response": f"a{i}", "score": i if i % 2 else f"s{i}"} for i in range(N)]
    selection = curate_all(write(tmp_path, "jsonl", records))
    with pytest.raises(UserError, match=r"field 'score' is (int|str) in record \d+ but (str|int) in record \d+"):
        export(selection, str(tmp_path / "out"), fmt)
    assert not (tmp_path / "out").exists()
    export(selection, str(tmp_path / "out.jsonl"))  # jsonl holds them as they were
    scores = {json.loads(x)["score"] for x in (tmp_path / "out.jsonl").read_text().splitlines()}
    assert scores == {r["score"] for r in records}


KILL_SCRIPT = """
import sys, time
import sftcurate.infra.store as store
real_fsync = store.os.fsync
def slow_fsync(fd):  # hold the export between writing its bytes and renaming them into place
    if store.os.readlink(f"/proc/self/fd/{fd}").startswith(sys.argv[2]):  # not the curated artifact's manifest
        print("written", flush=True)
        time.sleep(60)
    real_fsync(fd)
store.os.fsync = slow_fsync
from sftcurate.core.export import export
export(sys.argv[1], sys.argv[2], overwrite=True)
"""


def test_a_kill_mid_export_leaves_the_previous_file_whole(tmp_path, store_root):
    import os
    import signal
    import subprocess
    import sys

    selection = curate_all(write(tmp_path, "jsonl", [plain(i) for i in range(N)]))
    out = tmp_path / "train.jsonl"
    previous = "".join(json.dumps({"text": f"an earlier good export {i}"}) + "\n" for i in range(1000))
    out.write_text(previous)
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, selection, str(out)], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "SFTCURATE_STORE": store_root})
    try:
        assert proc.stdout.readline().strip() == "written"
        partial = list(tmp_path.glob("train.jsonl.*.partial"))
        assert len(partial) == 1 and partial[0].stat().st_size > 0  # the new bytes were on disk, under another name
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert out.read_text() == previous
    export(selection, str(out), overwrite=True)  # the rerun replaces it whole
    assert len(out.read_text().splitlines()) == N


def test_the_cli_prints_one_line_for_a_mixed_type_field_and_an_existing_out(tmp_path, store_root):
    from tests.helpers import invoke

    records = [{"prompt": f"q{i}", "response": f"a{i}", "score": i if i % 2 else f"s{i}"} for i in range(N)]
    selection = curate_all(write(tmp_path, "jsonl", records))
    for args, expected in [(["--out", tmp_path / "out.parquet", "--format", "parquet"], "field 'score' is"),
                           (["--out", tmp_path / "data.jsonl", "--overwrite"], "curated from")]:
        result = invoke("export", selection, *args)
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert result.exit_code == 2 and len(errors) == 1 and expected in errors[0], result.output[-2000:]
        assert "Traceback" not in result.output
    assert not (tmp_path / "out.parquet").exists()


def test_a_curated_artifact_missing_its_records_is_rebuilt_by_export(tmp_path, store_root):
    from pathlib import Path

    selection = curate_all(write(tmp_path, "jsonl", [plain(i) for i in range(N)]))
    curated = Path(export(selection, str(tmp_path / "first.jsonl"))["curated_uri"])
    (curated / "records.jsonl").unlink()
    result = export(selection, str(tmp_path / "again.jsonl"))
    assert Path(result["curated_uri"]) == curated and (curated / "records.jsonl").exists()
    assert (tmp_path / "again.jsonl").read_bytes() == (tmp_path / "first.jsonl").read_bytes()
