"""Ingest: every format and file type into one schema; dedupe, split, fingerprint; bad input -> one line."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sftcurate.infra.store import read_manifest
from sftcurate.core.config import SourceConfig
from sftcurate.core.ingest import IngestError, ingest, load_examples, load_pool, source_fingerprint
from tests.conftest import committed_manifests
from tests.helpers import qa_records, write_jsonl

TOK = "tiny-gpt2"


def run_ingest(uri: str, **kw) -> str:
    src = SourceConfig(uri=uri, **kw)
    return ingest(src, source_fingerprint(src), TOK, 128)


def test_formats_normalise_to_one_schema(tmp_path, store_root):
    write_jsonl(tmp_path / "pr.jsonl", [{"prompt": "P1", "response": "R1"}])
    write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "Do X", "input": "with Y", "output": "done"}])
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "system", "content": "S"},
                                                         {"role": "user", "content": "U"},
                                                         {"role": "assistant", "content": "A"}]}])
    write_jsonl(tmp_path / "sharegpt.jsonl", [{"conversations": [{"from": "human", "value": "H"},
                                                                  {"from": "gpt", "value": "G"}]}])
    write_jsonl(tmp_path / "text.jsonl", [{"text": "plain passage"}])
    write_jsonl(tmp_path / "custom.jsonl", [{"question": "Q?", "answer": "Ans"}])
    rows = {}
    for name in ("pr", "alpaca", "chat", "sharegpt", "text"):
        rows[name] = load_examples(run_ingest(str(tmp_path / f"{name}.jsonl"), heldout_fraction=0.0)).to_pylist()[0]
    custom = run_ingest(str(tmp_path / "custom.jsonl"), heldout_fraction=0.0,
                        columns={"prompt": "question", "response": "answer"})
    assert (rows["pr"]["prompt"], rows["pr"]["response"]) == ("P1", "R1")
    assert (rows["alpaca"]["prompt"], rows["alpaca"]["response"]) == ("Do X\n\nwith Y", "done")
    assert rows["chat"]["prompt"] == "System: S\nUser: U\nAssistant:" and rows["chat"]["response"] == "A"
    assert rows["sharegpt"]["prompt"] == "User: H\nAssistant:" and rows["sharegpt"]["response"] == "G"
    assert rows["text"]["prompt"] == "" and rows["text"]["response"] == "plain passage"
    assert load_examples(custom).to_pylist()[0]["response"] == "Ans"
    assert all(r["response_tokens"] > 0 for r in rows.values())


def test_a_chat_with_several_assistant_turns_has_the_loss_on_every_one(tmp_path, store_root):
    from sftcurate.core.tokenize import encode_pairs, example_rows
    from sftcurate.infra.models import resolve_tokenizer

    chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "first question"},
                         {"role": "assistant", "content": "first answer here"},
                         {"role": "user", "content": "second question"},
                         {"role": "assistant", "content": "second answer"}]}
    single = {"messages": [{"role": "user", "content": "only question"}, {"role": "assistant", "content": "only"}]}
    write_jsonl(tmp_path / "chat.jsonl", [chat, single])
    pool = load_pool(run_ingest(str(tmp_path / "chat.jsonl"), heldout_fraction=0.0))
    rows = {r["response"]: r for r in pool.to_pylist()}
    multi = rows["second answer"]
    assert multi["prompt"].endswith("User: second question\nAssistant:") and rows["only"]["turns"] == ""
    tok = resolve_tokenizer(TOK)
    encoded = dict(zip(pool.column("response").to_pylist(), encode_pairs(tok, example_rows(pool), 128)))
    e = encoded["second answer"]
    loss_ids = [t for t, m in zip(e.input_ids, e.loss_mask) if m]
    answers = [tok(" ".join(a.split()), add_special_tokens=False)["input_ids"] for a in ("first answer here",
                                                                                        "second answer")]
    assert loss_ids == answers[0] + [tok.eos_token_id] + answers[1] + [tok.eos_token_id]  # both turns, nothing else
    assert multi["response_tokens"] == e.n_loss  # budgets count what training sees
    assert rows["only"]["response_tokens"] == encoded["only"].n_loss


def test_file_types_and_globs(tmp_path, store_root):
    recs = qa_records(6)
    write_jsonl(tmp_path / "a.jsonl", recs[:2])
    (tmp_path / "b.json").write_text(json.dumps(recs[2:4]))
    pq.write_table(pa.Table.from_pylist(recs[4:5]), tmp_path / "c.parquet")
    (tmp_path / "d.csv").write_text("prompt,response\n" + f"\"{recs[5]['prompt']}\",\"{recs[5]['response']}\"\n")
    (tmp_path / "e.txt").write_text("First passage of plain text that is long enough.\n\n" * 1)
    uri = run_ingest(str(tmp_path / "*.*"), heldout_fraction=0.0)
    table = load_examples(uri)
    assert table.num_rows == 7
    assert {r.split("/")[-1] for r in table.column("source").to_pylist()} == {"a.jsonl", "b.json", "c.parquet", "d.csv", "e.txt"}


def test_builtin_python_docs_dedupe_split_fingerprint(store_root):
    uri = run_ingest("builtin:python-docs")
    meta = read_manifest(uri)["meta"]
    table = load_examples(uri)
    assert meta["n_examples"] == table.num_rows > 300
    assert meta["duplicates_removed"] > 0  # the language reference repeats some paragraphs
    assert len(set(table.column("id").to_pylist())) == table.num_rows
    assert 0.05 < meta["n_heldout"] / meta["n_examples"] < 0.2
    assert load_pool(uri).num_rows == meta["n_train"]
    # Deterministic: the same source gives the same artifact and fingerprint.
    assert run_ingest("builtin:python-docs") == uri


def test_duplicates_removed_and_counted(tmp_path, store_root):
    recs = qa_records(5)
    uri = run_ingest(str(write_jsonl(tmp_path / "d.jsonl", recs + recs[:3])), heldout_fraction=0.0)
    assert read_manifest(uri)["meta"]["duplicates_removed"] == 3
    assert load_examples(uri).num_rows == 5


def test_split_is_by_id_hash_not_position(tmp_path, store_root):
    recs = qa_records(60)
    a = load_examples(run_ingest(str(write_jsonl(tmp_path / "a.jsonl", recs)), heldout_fraction=0.3))
    b = load_examples(run_ingest(str(write_jsonl(tmp_path / "b.jsonl", recs[::-1])), heldout_fraction=0.3))
    split_a = dict(zip(a.column("id").to_pylist(), a.column("split").to_pylist()))
    split_b = dict(zip(b.column("id").to_pylist(), b.column("split").to_pylist()))
    assert split_a == split_b and "heldout" in split_a.values()


def test_changed_content_changes_fingerprint(tmp_path, store_root):
    path = write_jsonl(tmp_path / "a.jsonl", qa_records(5))
    before = source_fingerprint(SourceConfig(uri=str(path)))
    write_jsonl(path, qa_records(6))
    assert source_fingerprint(SourceConfig(uri=str(path))) != before


BAD_INPUTS = [
    ("missing.jsonl", None, "file not found"),
    ("empty.jsonl", "", "data set is empty"),
    ("unknown.jsonl", '{"foo": "bar"}\n', "unknown format"),
    ("missing_field.jsonl", '{"prompt": "p", "response": "r"}\n{"prompt": "p2"}\n', "line 2: field 'response' is missing"),
    ("null_field.jsonl", '{"prompt": "p", "response": null}\n', "line 1: field 'response' is null"),
    ("wrong_type.jsonl", '{"prompt": "p", "response": 5}\n', "field 'response' must be a string, got int"),
    ("not_json.jsonl", '{"prompt": "p", "response": "r"}\n{oops\n', "line 2: not valid JSON"),
    ("latin1.jsonl", b'{"text": "caf\xe9"}\n', "line 1: bytes are not valid UTF-8"),
    ("empty_text.jsonl", '{"text": "   "}\n', "line 1: the response/text field is empty"),
    ("chat_no_assistant.jsonl", '{"messages": [{"role": "user", "content": "hi"}]}\n', "no assistant turn"),
    ("ragged.csv", "prompt,response\np1,r1\np2,r2,an unquoted, comma\n", "row 2 (line 3): 4 fields, the header has 2"),
    ("short_row.csv", "prompt,response,topic\np1,r1,t\np2,r2\n", "row 2 (line 3): 2 fields, the header has 3"),
    ("surrogate.jsonl", '{"prompt": "p", "response": "r"}\n{"prompt": "p", "response": "smile \\ud83d"}\n',
     "line 2: field 'response' holds a lone surrogate \\ud83d"),
    ("surrogate_chat.json", '[{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", '
     '"content": "\\udc00 x"}]}]', "row 1: field 'messages[1].content' holds a lone surrogate \\udc00"),
    ("broken.jsonl.gz", b"\x1f\x8b not really gzip", "not a readable gzip file"),
]


@pytest.mark.parametrize("name,content,expected", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_one_line_error_and_nothing_committed(tmp_path, store_root, name, content, expected):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(IngestError) as info:
        run_ingest(str(path))
    message = str(info.value)
    assert expected in message and str(path) in message and "\n" not in message
    assert committed_manifests(store_root) == []


def test_unknown_builtin_is_clear(store_root):
    with pytest.raises(IngestError, match="unknown built-in data set"):
        run_ingest("builtin:nope")


def test_s3_source_is_read_through_the_s3_api(tmp_path, s3_env, store_root):
    import boto3

    from sftcurate.infra.settings import load_settings

    bucket = s3_env()
    body = "".join(json.dumps(r) + "\n" for r in qa_records(12)).encode()
    boto3.client("s3", endpoint_url=load_settings().s3.endpoint_url, region_name="us-east-1").put_object(
        Bucket=bucket, Key="data/part-0.jsonl", Body=body)
    uri = run_ingest(f"s3://{bucket}/data/*.jsonl", heldout_fraction=0.0)
    table = load_examples(uri)
    assert table.num_rows == 12 and table.column("source")[0].as_py() == f"s3://{bucket}/data/part-0.jsonl"
    with pytest.raises(IngestError, match="no file matches"):
        run_ingest(f"s3://{bucket}/nothing/*.jsonl")


def test_hugging_face_source_goes_through_load_dataset(tmp_path, store_root):
    # A local data set folder exercises the real `datasets.load_dataset` path without the network.
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"instruction": f"Say {i}", "output": f"I say {i} " * 3} for i in range(9)])
    uri = run_ingest(f"hf:{folder}", heldout_fraction=0.0)
    table = load_examples(uri)
    assert table.num_rows == 9 and table.column("prompt")[0].as_py().startswith("Say ")
    with pytest.raises(IngestError, match="could not load the Hugging Face dataset"):
        run_ingest(f"hf:{tmp_path / 'missing_dataset'}")


@pytest.mark.parametrize("suffix", [".gz", ".bz2", ".xz", ".zst"])
def test_compressed_sources_read_like_plain_ones(tmp_path, store_root, suffix):
    from fsspec.compression import compr

    from sftcurate.core.ingest import COMPRESSIONS

    recs = qa_records(12)
    plain = write_jsonl(tmp_path / "plain.jsonl", recs)
    packed = tmp_path / "packed" / f"data.jsonl{suffix}"
    packed.parent.mkdir()
    with open(packed, "wb") as raw, compr[COMPRESSIONS[suffix]](raw, mode="wb") as f:
        f.write(plain.read_bytes())
    assert packed.read_bytes() != plain.read_bytes()
    got = load_examples(run_ingest(str(packed), heldout_fraction=0.0))
    want = load_examples(run_ingest(str(plain), heldout_fraction=0.0))
    assert got.column("raw").to_pylist() == want.column("raw").to_pylist()
    folder = load_examples(run_ingest(str(packed.parent), heldout_fraction=0.0))  # a folder finds it too
    assert folder.column("id").to_pylist() == want.column("id").to_pylist()


def test_a_folder_reports_the_files_it_skips(tmp_path, store_root):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    write_jsonl(data / "a.jsonl", qa_records(4))
    (data / "notes.md").write_text("# not data")
    (data / "sub" / "b.jsonl.7z").write_bytes(b"7z")
    meta = read_manifest(run_ingest(str(data), heldout_fraction=0.0))["meta"]
    assert meta["n_examples"] == 4
    assert sorted(k.rsplit("/", 1)[-1] for k in meta["skipped_files"]) == ["b.jsonl.7z", "notes.md"]
    assert all("unknown file type" in why for why in meta["skipped_files"].values())


def test_a_run_summary_counts_the_skipped_files(tmp_path, store_root, prefect_harness):
    from sftcurate.core.config import CurateConfig
    from sftcurate.flows.curate import curate

    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "a.jsonl", qa_records(20))
    (data / "b.jsonl.lz4").write_bytes(b"a codec fsspec has no reader for here")
    summary = curate(CurateConfig.model_validate({"source": {"uri": str(data)}, "selection": {"budget": 3},
                                                  "models": {"target": TOK, "max_length": 128}}))
    assert summary["files_skipped"] == 1


def test_an_unreachable_hub_is_one_line_of_the_environment_without_retry_lines(store_root, monkeypatch, caplog):
    import logging

    import datasets
    from huggingface_hub.errors import LocalEntryNotFoundError

    from sftcurate.data_contracts.errors import DependencyError

    def load_dataset(*args, **kwargs):  # what datasets does with no network: retries logged, then ConnectionError
        for attempt in range(1, 6):
            logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry %d/5].", attempt)
        try:
            raise LocalEntryNotFoundError("outgoing traffic has been disabled")
        except LocalEntryNotFoundError as exc:
            raise ConnectionError("Couldn't reach 'org/data' on the Hub (LocalEntryNotFoundError)") from exc

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    before = logging.getLogger("huggingface_hub").level
    with caplog.at_level(logging.NOTSET), pytest.raises(DependencyError, match="hf:org/data: the Hugging Face hub "
                                                                                "could not be reached"):
        run_ingest("hf:org/data")
    assert not [r for r in caplog.records if "Retrying" in r.getMessage()]
    assert logging.getLogger("huggingface_hub").level == before  # the level is given back
