"""Ingest: any supported source -> one committed, validated examples artifact.

`ingest` builds the "examples" artifact through `infra.stages.build_once`: its key is the source content's
fingerprint, the ingest parameters, the tokenizer and this module's code (with everything it imports), so an
unchanged source is never re-ingested and a changed one never hits a stale artifact.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.compression import compr
from pydoc_data.topics import topics as PYTHON_DOC_TOPICS
from sftcurate.data_contracts import EXAMPLES, UserError
from sftcurate.data_contracts.errors import DependencyError
from sftcurate.data_contracts.manifests import ExamplesMeta
from sftcurate.core.config import SourceConfig
from sftcurate.infra import progress
from sftcurate.infra.hashing import fingerprint
from sftcurate.infra.models import hub_unreachable, model_fingerprint, quiet_hub_retries, resolve_tokenizer
from sftcurate.infra.stages import Built, build_once, read_meta
from sftcurate.infra.store import (file_digest, filesystem_for, join, read_bytes, read_table,
                                   retrying)
from sftcurate.core.formats import RecordError, detect_format, normalize
from sftcurate.core.training_text import fit_columns

BUILTIN_PYTHON_DOCS = "builtin:python-docs"
KIND = "examples"
FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt")
# compressed files read like plain ones (`data.jsonl.gz`); fsspec's codecs (zstd through `zstandard`)
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd"}
READABLE_SUFFIXES = FILE_SUFFIXES + tuple(s + c for s in FILE_SUFFIXES for c in COMPRESSIONS)


class IngestError(UserError):
    """Bad input: the message is one line naming the file, row and field."""


PROGRESS_EVERY = 500  # records between progress reports


# ---------------------------------------------------------------- where records come from

def source_kind(uri: str) -> str:
    if uri.startswith("builtin:"):
        if uri != BUILTIN_PYTHON_DOCS:
            raise IngestError(f"source '{uri}': unknown built-in data set (known: {BUILTIN_PYTHON_DOCS})")
        return "builtin"
    if uri.startswith("hf:"):
        return "hf"
    if uri.startswith(("s3://", "file://", "memory://", "/", ".", "~")) or uri.endswith(READABLE_SUFFIXES) \
            or any(c in uri for c in "*?["):
        return "files"
    if re.fullmatch(r"[\w.-]+(/[\w.-]+)?", uri):
        return "hf"
    return "files"


def resolve_files(uri: str) -> list[str]:
    return retrying(uri, lambda: _resolve_files(uri))


def skipped_files(uri: str) -> dict[str, str]:
    """The files of a folder source that are not read, each with the reason (shown in the examples artifact's
    meta, `skipped_files`): a folder never drops a file without saying so."""
    return retrying(uri, lambda: _skipped_files(uri))


def _skipped_files(uri: str) -> dict[str, str]:
    fs, path = filesystem_for(uri)
    if any(c in path for c in "*?[") or not fs.isdir(path):
        return {}
    return {p: f"unknown file type '{PurePosixPath(p).suffix}' (read: {', '.join(FILE_SUFFIXES)}, optionally "
               f"compressed {'/'.join(COMPRESSIONS)})" for p in sorted(fs.find(path))
            if not p.lower().endswith(READABLE_SUFFIXES)}


def _resolve_files(uri: str) -> list[str]:
    fs, path = filesystem_for(uri)
    if any(c in path for c in "*?["):
        paths = sorted(fs.glob(path))
        if not paths:
            raise IngestError(f"{uri}: no file matches this pattern; check the path")
    elif fs.isdir(path):
        paths = sorted(p for p in fs.find(path) if p.lower().endswith(READABLE_SUFFIXES))
        if not paths:
            raise IngestError(f"{uri}: folder holds no {'/'.join(FILE_SUFFIXES)} files (plain or "
                              f"{'/'.join(COMPRESSIONS)})")
    elif fs.exists(path):
        paths = [path]
    else:
        raise IngestError(f"{uri}: file not found; check the path (or the S3 bucket and credentials)")
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    prefix = "" if protocol in ("file", "local") else f"{protocol}://"
    return [f"{prefix}{p}" for p in paths]


def source_fingerprint(source: SourceConfig) -> str:
    """Fingerprint of the source's content (files hashed), cheap enough to compute before every run."""
    kind = source_kind(source.uri)
    if kind == "builtin":
        return fingerprint("builtin", sys.version_info[:2],
                           hashlib.sha256(repr(sorted(PYTHON_DOC_TOPICS.items())).encode()).hexdigest())
    if kind == "hf":
        return fingerprint("hf", source.uri, source.hf_config, source.hf_split)
    h = hashlib.sha256()
    for uri in resolve_files(source.uri):
        h.update(uri.encode())
        h.update(retrying(uri, lambda: file_digest(uri)))
    return h.hexdigest()[:16]


def split_passages(text: str, target_chars: int) -> list[str]:
    """Paragraphs grouped into passages of about `target_chars` characters."""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    passages, current = [], ""
    for p in paragraphs:
        if current and len(current) + len(p) + 2 > target_chars:
            passages.append(current)
            current = p
        else:
            current = f"{current}\n\n{p}" if current else p
    if current:
        passages.append(current)
    return [p for p in passages if len(p) >= 40]


@dataclass
class RawRecord:
    where: str     # file (or data set) the record came from
    row: str       # "line 3" / "row 3"
    record: dict


def _decode(uri: str, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise IngestError(f"{uri}: line {line}: bytes are not valid UTF-8 (at byte {exc.start}); "
                          "re-encode the file as UTF-8") from None


def decompressed(uri: str, data: bytes, codec: str) -> bytes:
    if codec not in compr:
        raise IngestError(f"{uri}: reading {codec} files needs the '{'zstandard' if codec == 'zstd' else codec}' "
                          "package; install it or decompress the file")
    try:
        with compr[codec](io.BytesIO(data), mode="rb") as f:
            return f.read()
    except Exception as exc:  # each codec has its own error types (BadGzipFile, LZMAError, ZstdError, EOFError)
        raise IngestError(f"{uri}: not a readable {codec} file ({type(exc).__name__}: {exc}); check the file "
                          "or its suffix") from None


def read_file_records(uri: str, passage_chars: int) -> list[RawRecord]:
    _, path = filesystem_for(uri)
    data = read_bytes(uri)
    name = PurePosixPath(path)
    codec = COMPRESSIONS.get(name.suffix.lower())
    if codec:
        data, name = decompressed(uri, data, codec), name.with_suffix("")
    suffix = name.suffix.lower()
    if suffix == ".parquet":
        try:
            rows = pq.read_table(io.BytesIO(data)).to_pylist()
        except pa.ArrowInvalid as exc:
            raise IngestError(f"{uri}: not a readable parquet file ({exc})") from None
        return [RawRecord(uri, f"row {i + 1}", r) for i, r in enumerate(rows)]
    text = _decode(uri, data)
    if suffix == ".jsonl":
        out = []
        for i, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                out.append(RawRecord(uri, f"line {i + 1}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise IngestError(f"{uri}: line {i + 1}: not valid JSON ({exc.msg}); fix or remove the line") from None
            if "\\u" in line:  # only an escape can make a lone surrogate, which no UTF-8 writer can store
                refuse_lone_surrogates(out[-1])
        return out
    if suffix == ".json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise IngestError(f"{uri}: line {exc.lineno}: not valid JSON ({exc.msg})") from None
        if isinstance(obj, dict):
            obj = next((obj[k] for k in ("data", "examples", "rows", "train") if isinstance(obj.get(k), list)), None)
        if not isinstance(obj, list):
            raise IngestError(f"{uri}: expected a JSON list of records (or an object with a 'data' list)")
        records = [RawRecord(uri, f"row {i + 1}", r) for i, r in enumerate(obj)]
        if "\\u" in text:
            for record in records:
                refuse_lone_surrogates(record)
        return records
    if suffix == ".csv":
        return read_csv_records(uri, text)
    if suffix == ".txt":
        return [RawRecord(uri, f"passage {i + 1}", {"text": p}) for i, p in enumerate(split_passages(text, passage_chars))]
    raise IngestError(f"{uri}: unknown file type '{suffix}'; use one of {', '.join(FILE_SUFFIXES)}")


def read_csv_records(uri: str, text: str) -> list[RawRecord]:
    """One record per row under the header's names; a row with more or fewer fields than the header is refused
    (an unquoted comma shifts every field after it, which would train on the wrong text without a word)."""
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None) or []
    out = []
    for i, row in enumerate(reader):
        if not row:
            continue
        if len(row) != len(header):
            raise IngestError(f"{uri}: row {i + 1} (line {reader.line_num}): {len(row)} fields, the header has "
                              f"{len(header)}; quote fields that contain commas, or fix the row")
        out.append(RawRecord(uri, f"row {i + 1}", dict(zip(header, row))))
    return out


def refuse_lone_surrogates(raw: RawRecord) -> None:
    """A JSON escape like "\\ud83d" without its pair decodes to half a character that cannot be written as UTF-8
    (tokenizers, parquet and export all fail on it later): refused here, naming the field."""
    def walk(value, where: str):
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                return where, value[exc.start]
        elif isinstance(value, dict):
            for k, v in value.items():
                found = walk(v, f"{where}.{k}" if where else str(k))
                if found:
                    return found
        elif isinstance(value, list):
            for j, v in enumerate(value):
                found = walk(v, f"{where}[{j}]")
                if found:
                    return found
        return None

    found = walk(raw.record, "")
    if found:
        field, char = found
        raise IngestError(f"{raw.where}: {raw.row}: field '{field}' holds a lone surrogate \\u{ord(char):04x} (half "
                          "of a character, e.g. an emoji cut in two); write the whole character or its escape pair")


def read_builtin_python_docs(passage_chars: int) -> list[RawRecord]:
    out = []
    for topic in sorted(PYTHON_DOC_TOPICS):
        for i, p in enumerate(split_passages(PYTHON_DOC_TOPICS[topic], passage_chars)):
            out.append(RawRecord(f"python-docs:{topic}", f"passage {i + 1}", {"text": p}))
    return out


def read_hf_records(source: SourceConfig) -> list[RawRecord]:
    import datasets  # deferred on purpose: Hugging Face datasets (hundreds of modules), for hf: sources only

    name = source.uri[3:] if source.uri.startswith("hf:") else source.uri
    try:
        with quiet_hub_retries():
            ds = datasets.load_dataset(name, source.hf_config, split=source.hf_split)
    except Exception as exc:  # the hub raises many types; the user needs the name and the reason
        if hub_unreachable(exc):
            raise DependencyError(f"hf:{name}: the Hugging Face hub could not be reached and the dataset is not "
                                  "in the local cache; check the network (HF_HUB_OFFLINE), or download it and point "
                                  "source.uri at its files") from None
        raise IngestError(f"hf:{name}: could not load the Hugging Face dataset ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    return [RawRecord(f"hf:{name}", f"row {i + 1}", r) for i, r in enumerate(ds)]


def read_records(source: SourceConfig) -> list[RawRecord]:
    kind = source_kind(source.uri)
    if kind == "builtin":
        records = read_builtin_python_docs(source.passage_chars)
    elif kind == "hf":
        records = read_hf_records(source)
    else:
        records = [r for uri in resolve_files(source.uri) for r in read_file_records(uri, source.passage_chars)]
    if source.limit is not None:
        records = records[: source.limit]
    if source.sample is not None and source.sample < len(records):
        keep = np.sort(np.random.default_rng(source.sample_seed).choice(len(records), source.sample, replace=False))
        records = [records[i] for i in keep]
    if not records:
        raise IngestError(f"{source.uri}: the data set is empty; point source.uri at a file with records")
    return records


# ---------------------------------------------------------------- canonical examples

def example_id(prompt: str, response: str) -> str:
    return hashlib.sha256(f"{prompt}\x1f{response}".encode()).hexdigest()[:20]


def is_heldout(ids: list[str], fraction: float) -> np.ndarray:
    return np.array([int(i[:8], 16) / 2**32 < fraction for i in ids], dtype=bool)


def heldout_mask(ids: list[str], groups: list[str], source, named: list | None = None) -> np.ndarray:
    """The held-out split: what the records name in `source.split_field` (`named`), else
    `source.heldout_per_group` examples of every group (those with the lowest id hashes, at most half of a
    group, so it keeps training examples), else `source.heldout_fraction` of all by id hash. Each depends on the
    examples' content alone: every run draws the same split."""
    if source.split_field is not None:
        return np.array([s == "heldout" for s in named], dtype=bool)
    if source.heldout_per_group is None:
        return is_heldout(ids, source.heldout_fraction)
    mask = np.zeros(len(ids), dtype=bool)
    g = np.asarray(groups, dtype=object)
    for name in set(groups):
        members = np.flatnonzero(g == name)
        take = min(source.heldout_per_group, len(members) // 2)
        mask[members[np.argsort([ids[i] for i in members], kind="stable")[:take]]] = True
    return mask


@dataclass
class IngestStats:
    records: int = 0
    duplicates_removed: int = 0
    formats: dict = field(default_factory=dict)
    text: dict = field(default_factory=dict)   # template and too_long counts (`core.training_text.Fitted.meta`)


def build_examples(source: SourceConfig, tokenizer, max_length: int,
                   template: str = "auto") -> tuple[pa.Table, IngestStats]:
    records = read_records(source)
    stats = IngestStats(records=len(records))
    columns: dict[str, list] = {name: [] for name in ("id", "prompt", "response", "turns", "source", "group", "origin",
                                                       "split_hint", "format", "raw")}
    seen: set[str] = set()
    fmt_by_file: dict[str, str] = {}
    for n_read, raw in enumerate(records, 1):
        if n_read % PROGRESS_EVERY == 0 or n_read == len(records):
            progress.step("ingest", n_read, len(records), unit="records")
        fmt = source.format
        if fmt == "auto":
            if raw.where not in fmt_by_file:
                if not isinstance(raw.record, dict):
                    raise IngestError(f"{raw.where}: {raw.row}: record must be an object, got "
                                      f"{type(raw.record).__name__}")
                detected = detect_format(set(raw.record), source.columns)
                if detected is None:
                    raise IngestError(
                        f"{raw.where}: {raw.row}: unknown format (columns {sorted(raw.record)}); set source.format "
                        "or map your columns with source.columns, e.g. {prompt: question, response: answer}")
                fmt_by_file[raw.where] = detected
            fmt = fmt_by_file[raw.where]
        try:
            prompt, response, turns = normalize(raw.record, fmt, source.columns)
        except RecordError as exc:
            raise IngestError(f"{raw.where}: {raw.row}: {exc}; fix or drop this record") from None
        if not response.strip():
            raise IngestError(f"{raw.where}: {raw.row}: the response/text field is empty; fix or drop this record")
        stats.formats[fmt] = stats.formats.get(fmt, 0) + 1
        eid = example_id(prompt, response)
        if eid in seen:
            stats.duplicates_removed += 1
            continue
        seen.add(eid)
        for name, value in (("id", eid), ("prompt", prompt), ("response", response), ("turns", turns),
                            ("source", raw.where),
                            ("group", record_group(raw, source.group_field)), ("origin", f"{raw.where}: {raw.row}"),
                            ("split_hint", record_split(raw, source.split_field)),
                            ("format", fmt), ("raw", raw_json(raw))):
            columns[name].append(value)
    # the split is drawn once, before source.too_long drops anything, and travels with the rows that stay: a
    # per-group draw made again after a drop could move a held-out example (never cut) into the pool
    columns["heldout"] = list(heldout_mask(columns["id"], columns["group"], source, columns.pop("split_hint")))
    # the one text every stage trains on, and source.too_long (core/training_text.py)
    columns, prompt_tokens, loss_tokens, stats.text = fit_columns(columns, source, tokenizer, max_length, template,
                                                                  np.array(columns["heldout"], dtype=bool))
    heldout = np.array(columns.pop("heldout"), dtype=bool)
    if heldout.all():
        raise IngestError(f"{source.uri}: every example fell into the held-out split; lower source.heldout_fraction "
                          "or add data")
    table = pa.table({
        **columns, "prompt_tokens": prompt_tokens, "response_tokens": loss_tokens,
        "split": np.where(heldout, "heldout", "train").tolist(),
    })
    return table, stats


def raw_json(raw: RawRecord) -> str:
    """The user's record exactly as read (every field, in order), for export; values JSON cannot hold (bytes,
    dates in parquet) become their string form."""
    return json.dumps(raw.record, ensure_ascii=False, default=str)


SPLITS = ("train", "heldout")


def record_split(raw: RawRecord, field: str | None) -> str | None:
    """The split a record names in `source.split_field` (train or heldout), or None without one."""
    if field is None:
        return None
    value = raw.record.get(field) if isinstance(raw.record, dict) else None
    if value not in SPLITS:
        raise IngestError(f"{raw.where}: {raw.row}: field '{field}' (source.split_field) is {value!r}; it must be "
                          f"one of {', '.join(SPLITS)}")
    return value


def record_group(raw: RawRecord, field: str | None) -> str:
    """The group an example belongs to for per-group metrics: the record's `field`, or where it came from."""
    if field is None:
        return raw.where
    value = raw.record.get(field) if isinstance(raw.record, dict) else None
    if value is None or (isinstance(value, str) and not value.strip()):
        raise IngestError(f"{raw.where}: {raw.row}: field '{field}' (source.group_field) is missing or empty; "
                          "fill it, or unset source.group_field to group by file")
    return str(value)


def examples_fingerprint(table: pa.Table) -> str:
    return fingerprint(table.column("id").to_pylist(), table.column("split").to_pylist())


def ingest(source: SourceConfig, source_fp: str, tokenizer_spec: str, max_length: int, template: str = "auto",
           store_root: str | None = None) -> Built:
    """The examples artifact of this source (built and committed unless it already is); returns its URI."""
    def build(writer) -> None:
        table, stats = build_examples(source, resolve_tokenizer(tokenizer_spec), max_length, template)
        train = np.array(table.column("split").to_pylist()) == "train"
        writer.write_table("examples.parquet", table, EXAMPLES)
        writer.meta.update({
            "fingerprint": examples_fingerprint(table), "source": source.uri, "source_fingerprint": source_fp,
            "records": stats.records, "duplicates_removed": stats.duplicates_removed, "formats": stats.formats,
            "n_examples": table.num_rows, "n_train": int(train.sum()), "n_heldout": int((~train).sum()),
            "train_tokens": int(np.asarray(table.column("response_tokens"))[train].sum()),
            "tokenizer": tokenizer_spec, "max_length": max_length, "columns": source.columns, **stats.text,
            "skipped_files": skipped_files(source.uri) if source_kind(source.uri) == "files" else {},
        })

    params = {"source": source, "source_fingerprint": source_fp, "tokenizer": model_fingerprint(tokenizer_spec),
              "max_length": max_length, "template": template}
    return build_once(KIND, __name__, params, build, store_root=store_root, meta=ExamplesMeta)


# ---------------------------------------------------------------- readers for later stages

def load_examples(examples_uri: str) -> pa.Table:
    return read_table(join(examples_uri, "examples.parquet"), EXAMPLES)


def load_split(examples_uri: str, split: str) -> pa.Table:
    table = load_examples(examples_uri)
    mask = pa.compute.equal(table.column("split"), split)
    return table.filter(mask)


def load_pool(examples_uri: str) -> pa.Table:
    """The train split in artifact order: row i is pool index i for every selector."""
    return load_split(examples_uri, "train")


def examples_meta(examples_uri: str) -> ExamplesMeta:
    """The examples artifact's manifest meta, typed: `examples_meta(uri).n_train`."""
    return read_meta(examples_uri, ExamplesMeta)


def n_shards(n: int, shard_size: int) -> int:
    return max(1, -(-n // shard_size))


def shard_bounds(n: int, shard_index: int, shard_size: int) -> tuple[int, int]:
    """[lo, hi) of pool rows that shard `shard_index` owns."""
    return min(n, shard_index * shard_size), min(n, (shard_index + 1) * shard_size)
