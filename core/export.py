"""Get the curated data out: the selected records exactly as the user gave them (every field, in pick order),
optionally as OpenAI `messages` for trainers, or as a Hugging Face `datasets` folder.

The `curate` flow commits the "curated" artifact (`records.jsonl`: the original records; `messages.jsonl`: the
same records as chat messages; both in pick order, each line with its origin in `curated.parquet`).
`export` writes it wherever the user wants (a local path or `s3://`), in the format their trainer reads.
"""
from __future__ import annotations

import io
import json
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq

from sftcurate.core.formats import ROLE_NAMES, column
from sftcurate.core.ingest import load_examples
from sftcurate.core.selection import load_selection
from sftcurate.data_contracts import UserError
from sftcurate.infra.stages import Built, build_once
from sftcurate.infra.store import filesystem_for, join, read_bytes, read_manifest, write_bytes

KIND = "curated"
ExportFormat = Literal["jsonl", "parquet", "messages", "hf"]
CHAT_FIELDS = {"messages": ("messages", "role", "content"), "sharegpt": ("conversations", "from", "value")}


def as_messages(raw: dict, fmt: str, prompt: str, response: str, columns: dict[str, str]) -> list[dict]:
    """The record as OpenAI chat messages: every turn of a chat (system message included), else one user turn
    (the prompt, when there is one) and one assistant turn (the response)."""
    if fmt in CHAT_FIELDS:
        name, role_key, text_key = CHAT_FIELDS[fmt]
        return [{"role": ROLE_NAMES[str(turn[role_key]).lower()], "content": turn[text_key]}
                for turn in raw[column(columns, name)]]
    user = [{"role": "user", "content": prompt}] if prompt else []
    return user + [{"role": "assistant", "content": response}]


def curated_rows(examples_uri: str, selection_uri: str) -> list[dict]:
    """Every picked example with its raw record, in pick order."""
    examples = load_examples(examples_uri)
    by_id = {r["id"]: r for r in examples.select(["id", "prompt", "response", "origin", "format", "raw"]).to_pylist()}
    picks, _ = load_selection(selection_uri)
    return [{**by_id[pid], "rank": rank} for pid, rank in zip(picks.column("id").to_pylist(),
                                                              picks.column("rank").to_pylist())]


def commit_curated(examples_uri: str, selection_uri: str, store_root: str | None = None) -> Built:
    """The curated artifact of a selection: the original records and their chat-message form, in pick order."""

    def build(writer) -> None:
        columns = read_manifest(examples_uri)["meta"].get("columns") or {}
        rows = curated_rows(examples_uri, selection_uri)
        writer.write_bytes("records.jsonl", "".join(r["raw"] + "\n" for r in rows).encode())
        writer.write_bytes("messages.jsonl", "".join(
            json.dumps({"messages": as_messages(json.loads(r["raw"]), r["format"], r["prompt"], r["response"],
                                                columns)}, ensure_ascii=False) + "\n" for r in rows).encode())
        index = pa.table({"rank": [r["rank"] for r in rows], "id": [r["id"] for r in rows],
                          "origin": [r["origin"] for r in rows], "format": [r["format"] for r in rows]})
        buf = io.BytesIO()
        pq.write_table(index, buf)
        writer.write_bytes("curated.parquet", buf.getvalue())
        writer.meta.update({"records": len(rows), "selection_uri": selection_uri, "examples_uri": examples_uri})

    return build_once(KIND, __name__, {}, build, upstream={"examples": examples_uri, "selection": selection_uri},
                      store_root=store_root)


def records(curated_uri: str) -> list[dict]:
    return [json.loads(line) for line in read_bytes(join(curated_uri, "records.jsonl")).decode().splitlines()]


def export(selection_uri: str, out: str, fmt: ExportFormat = "jsonl", push_to_hub: str | None = None) -> dict:
    """Write the selected records to `out` (local or s3://): `jsonl` / `parquet` the original records,
    `messages` OpenAI chat messages (jsonl), `hf` a `datasets.load_from_disk` folder; `push_to_hub` also
    uploads them as a Hugging Face dataset repo (needs the network and a token)."""
    meta = read_manifest(selection_uri)["meta"]
    if "examples_uri" not in meta:
        raise UserError(f"{selection_uri}: not a selection committed by `sftcurate run`; pass the selection_uri "
                        "its summary printed")
    curated = commit_curated(meta["examples_uri"], selection_uri)
    rows = records(curated)
    if fmt == "jsonl":
        write_bytes(out, read_bytes(join(curated, "records.jsonl")))
    elif fmt == "messages":
        write_bytes(out, read_bytes(join(curated, "messages.jsonl")))
    elif fmt == "parquet":
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows), buf)
        write_bytes(out, buf.getvalue())
    elif fmt == "hf":
        hf_dataset(rows).save_to_disk(out, storage_options=_storage_options(out))
    else:
        raise UserError(f"--format {fmt}: use jsonl, parquet, messages or hf")
    if push_to_hub:
        hf_dataset(rows).push_to_hub(push_to_hub)
    return {"records": len(rows), "out": out, "format": fmt, "curated_uri": str(curated),
            "pushed_to": push_to_hub}


def hf_dataset(rows: list[dict]):
    import datasets

    return datasets.Dataset.from_list(rows)


def _storage_options(uri: str) -> dict | None:
    fs, _ = filesystem_for(uri)
    return fs.storage_options if uri.startswith("s3://") else None
