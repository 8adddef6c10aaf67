"""Get the curated data out: the selected records exactly as the user gave them (every field, in pick order),
optionally as OpenAI `messages` for trainers, or as a Hugging Face `datasets` folder.

The `curate` flow commits the "curated" artifact (`records.jsonl`: the original records; `messages.jsonl`: the
same records as chat messages; both in pick order, each line with its origin in `curated.parquet`).
`export` writes it wherever the user wants (a local path or `s3://`), in the format their trainer reads.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Literal, get_args

import pyarrow as pa
import pyarrow.parquet as pq

from sftcurate.core.formats import ROLE_NAMES, column
from sftcurate.core.ingest import load_examples
from sftcurate.core.selection import load_selection, selection_meta
from sftcurate.data_contracts import EXAMPLES, UserError
from sftcurate.data_contracts.errors import DependencyError
from sftcurate.data_contracts.manifests import CuratedMeta, ExamplesMeta
from sftcurate.infra.stages import Built, build_once, read_meta
from sftcurate.infra.store import exists, filesystem_for, join, read_bytes, read_table, root_of, write_whole

KIND = "curated"
ExportFormat = Literal["jsonl", "parquet", "messages", "hf"]
EXPORT_FORMATS = get_args(ExportFormat)
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
        columns = read_meta(examples_uri, ExamplesMeta).columns
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
                      store_root=store_root, meta=CuratedMeta)


def records(curated_uri: str) -> list[dict]:
    return [json.loads(line) for line in read_bytes(join(curated_uri, "records.jsonl")).decode().splitlines()]


def export(selection_uri: str, out: str, fmt: ExportFormat = "jsonl", push_to_hub: str | None = None,
           overwrite: bool = False) -> dict:
    """Write the selected records to `out` (local or s3://): `jsonl` / `parquet` the original records,
    `messages` OpenAI chat messages (jsonl), `hf` a `datasets.load_from_disk` folder; `push_to_hub` also
    uploads them as a Hugging Face dataset repo (needs the network and a token).

    An existing `out` is replaced only with `overwrite`, and never when it is a file the selection was curated
    from. The output appears whole or not at all (a temporary name renamed over `out`; on S3 one PUT), so a
    kill or a full disk mid-export leaves the previous file as it was."""
    if fmt not in EXPORT_FORMATS:
        raise UserError(f"--format {fmt}: use jsonl, parquet, messages or hf")
    examples_uri = selection_meta(selection_uri).examples_uri  # one line if it is not a selection
    check_destination(out, examples_uri, fmt, overwrite)
    # the curated artifact lives beside the selection, not in whatever store the current folder implies
    curated = commit_curated(examples_uri, selection_uri, store_root=root_of(selection_uri))
    rows = records(curated)
    if fmt == "jsonl":
        write_whole(out, read_bytes(join(curated, "records.jsonl")))
    elif fmt == "messages":
        write_whole(out, read_bytes(join(curated, "messages.jsonl")))
    elif fmt == "parquet":
        buf = io.BytesIO()
        pq.write_table(arrow_table(rows, out), buf)
        write_whole(out, buf.getvalue())
    else:
        save_folder_whole(hf_dataset(rows, out), out)
    if push_to_hub:
        push(hf_dataset(rows, push_to_hub), push_to_hub)
    return {"records": len(rows), "out": out, "format": fmt, "curated_uri": str(curated),
            "pushed_to": push_to_hub}


def _local_path(uri: str) -> Path | None:
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    return None if "://" in uri else Path(uri).expanduser().resolve()


def source_files(examples_uri: str) -> set[str]:
    """Every file the pool was read from (the examples' `source` column: resolved paths or URIs)."""
    table = read_table(join(examples_uri, "examples.parquet"), EXAMPLES)
    return set(table.column("source").unique().to_pylist())


def check_destination(out: str, examples_uri: str, fmt: str, overwrite: bool) -> None:
    """Refuse, before anything is written or committed, an `out` that would lose the user's data."""
    local = _local_path(out)
    for source in source_files(examples_uri):
        src = _local_path(source)
        same = (src is not None and local is not None and (src == local or (
            local.exists() and src.exists() and os.path.samefile(src, local)))) or source == out
        if same:
            raise UserError(f"{out}: this is a file the selection was curated from; export to another path "
                            "(--overwrite never replaces a source)")
    if not exists(out):
        return
    if local is not None and local.is_dir() and fmt != "hf":
        raise UserError(f"{out}: is a folder; give a file path for --format {fmt}")
    if local is not None and local.is_file() and fmt == "hf":
        raise UserError(f"{out}: is a file; --format hf writes a folder, give a folder path")
    if not overwrite:
        raise UserError(f"{out}: already exists; pass --overwrite to replace it, or choose another path")


def arrow_table(rows: list[dict], out: str) -> pa.Table:
    """The records as one Arrow table; a field whose type varies across records (a number here, a string there),
    which JSON holds but a columnar format cannot, is named with the two records that disagree."""
    try:
        return pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
        field, detail = mixed_field(rows)
        if field is None:
            raise UserError(f"{out}: the records cannot be stored as one table ({exc}); export as jsonl") from None
        raise UserError(f"{out}: field '{field}' {detail}; parquet and hf need one type per field: export as "
                        "jsonl (or make the field one type in the source)") from None


def mixed_field(rows: list[dict]) -> tuple[str | None, str]:
    """The first field whose values Arrow cannot hold in one column, and which records (pick ranks) disagree."""
    names = list(dict.fromkeys(k for r in rows for k in r))
    for name in names:
        values = [r.get(name) for r in rows]
        try:
            pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            typed = [(i, type(v).__name__) for i, v in enumerate(values) if v is not None]
            first = typed[0]
            other = next(((i, t) for i, t in typed if t != first[1]), None)
            if other is None:
                return name, "holds values Arrow cannot put in one column"
            return name, (f"is {first[1]} in record {first[0] + 1} but {other[1]} in record {other[0] + 1} "
                          "(pick order)")
    return None, ""


def save_folder_whole(dataset, out: str) -> None:
    """`save_to_disk` into a temporary folder beside `out`, then renamed over it: a reader never sees half a
    dataset. On S3 (no rename) the files are written in place."""
    local = _local_path(out)
    if local is None:
        return dataset.save_to_disk(out, storage_options=_storage_options(out))
    tag = uuid.uuid4().hex[:12]
    partial = local.with_name(f".{local.name}.{tag}.partial")
    old = local.with_name(f".{local.name}.{tag}.old")
    local.parent.mkdir(parents=True, exist_ok=True)
    try:
        dataset.save_to_disk(str(partial))
        if local.exists():
            local.rename(old)
        partial.rename(local)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def push(dataset, repo: str) -> None:
    """Upload to the hub; a hub that cannot be reached or refuses the token is one line naming the repo."""
    try:
        dataset.push_to_hub(repo)
    except Exception as exc:  # huggingface_hub raises many types (HTTP, offline, auth); the user needs the reason
        raise DependencyError(f"--push-to-hub {repo}: the upload failed ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}); check the network and "
                              "HF_TOKEN (the export itself was written)") from None


def hf_dataset(rows: list[dict], out: str):
    import datasets  # deferred on purpose: Hugging Face datasets (hundreds of modules), for --format hf only

    arrow_table(rows, out)  # a field of mixed types is one line naming it, not datasets' ArrowTypeError
    return datasets.Dataset.from_list(rows)


def _storage_options(uri: str) -> dict | None:
    fs, _ = filesystem_for(uri)
    return fs.storage_options if uri.startswith("s3://") else None
