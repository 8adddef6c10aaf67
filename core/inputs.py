"""Readers of what selectors need beyond the pool: token features (FisherSFT, DensitySampling) and loss
trajectories (S2L), from committed artifacts or from plain files, checked against the pool they claim to cover.

Kept apart from the stages that make them (`embedding`, `trajectories`) so that selecting depends only on
how inputs are read, not on how they were computed. Which reader serves which requirement is declared once
per requirement, in `core.requirements`.
"""
from __future__ import annotations

import hashlib
import io
import json
import mmap
import os
import re
import struct
from typing import NamedTuple

import numpy as np

from sftcurate.core.feature_rows import ShardedRows, row_chunks
from sftcurate.core.selectors.base import check_pool_alignment
from sftcurate.data_contracts import (
    TOKEN_FEATURES as TOKEN_FEATURES_CONTRACT, TOKEN_FEATURES_IDS, TRAJECTORIES as TRAJECTORIES_CONTRACT,
    TRAJECTORIES_IDS, ContractError, validate_tensors,
)
from sftcurate.infra.local_cache import local_copy
from sftcurate.infra.settings import load_settings
from sftcurate.infra.store import (exists, file_digest, is_committed, join, read_bytes, read_manifest, read_table,
                                   read_tensors, root_of)


def mean_pool(features, offsets: np.ndarray, chunk_rows: int = 1 << 18) -> np.ndarray:
    """One vector per example: the mean of its token features (zeros for an example with none). Streams the
    rows a block at a time (float64 prefix sums), so memory-mapped shards are never loaded whole."""
    offsets = np.asarray(offsets, dtype=np.int64)
    counts = np.diff(offsets)
    d = int(features.shape[1])
    prefix = np.zeros((len(offsets), d), dtype=np.float64)  # prefix[j] = sum of the rows before offsets[j]
    carry = np.zeros(d, dtype=np.float64)
    for lo, block in row_chunks(features, chunk_rows):
        hi = lo + len(block)
        cs = np.cumsum(np.asarray(block, dtype=np.float64), axis=0)
        inside = np.flatnonzero((offsets > lo) & (offsets <= hi))
        prefix[inside] = carry + cs[offsets[inside] - lo - 1]
        carry = carry + cs[-1]
    sums = prefix[1:] - prefix[:-1]
    return (sums / np.maximum(counts, 1)[:, None]).astype(np.float32)


# ---------------------------------------------------------------- token features
#
# A "token_features" artifact holds no feature bytes of its own: `shards.json` lists the committed
# "token_features_shard" artifacts (store-relative `artifact` paths, so a moved or synced store still resolves),
# and the reader memory-maps every shard's `features.safetensors` in place. A 10^6-sentence pool is 8 GB of
# float32: the store keeps it once, and a reader never holds it in anonymous memory. Artifacts committed before
# this layout (`features-00000.safetensors` copies inside the folder) are read the same way.

SHARD_REFS = "shards.json"
# A shard written with `embedding.sentence_rank` r holds each sentence's rank-r factor (min(tokens, r) rows whose
# Gram is the rank-r part of the tokens' Gram, `core.fisher_features.stored_factors`), not its tokens; its
# safetensors metadata says r, and its ids' n_tokens stay the real loss tokens (what a token budget counts).
SENTENCE_RANK = "sftcurate.sentence_rank"
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
           "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def _is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def _local_file(uri: str, sha256: str | None = None) -> str:
    """A local path holding the bytes of `uri`: the file itself when local, else a copy in the shard cache
    (`$SFTCURATE_HOME/cache/tensors/<sha256>.safetensors`, checked against the sha256 before it is kept).
    Without a known sha256 the download is named by the URI's hash and re-fetched every time."""
    if _is_local(uri):
        return uri[len("file://"):] if uri.startswith("file://") else uri

    def check(tmp) -> None:  # the download itself: not remembered, unlike local_cache.file_sha256
        if file_digest(str(tmp)).hex() != sha256:
            raise ContractError(f"{uri}: downloaded bytes do not match the sha256 its manifest records; "
                                "the artifact was altered after it was committed: delete it and re-run")

    name = sha256 or "uri-" + hashlib.sha256(uri.encode()).hexdigest()
    try:
        return str(local_copy(uri, load_settings().home / "cache" / "tensors", f"{name}.safetensors",
                              verify=check if sha256 else None, refresh=not sha256))
    except FileNotFoundError as exc:
        raise ContractError(f"{uri}: file not found") from exc


def map_tensors(uri: str, contract=TOKEN_FEATURES_CONTRACT, sha256: str | None = None
                ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The tensors of a safetensors file as read-only arrays over a memory map (no copy; an s3:// file is first
    downloaded to the local cache), validated by `contract`. Tensors of a dtype numpy lacks (bf16) are refused."""
    path = _local_file(uri, sha256)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            if size < 8:
                raise ValueError(f"{size} bytes, shorter than a safetensors header")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError(f"header length {n} exceeds the file size {size}")
            header = json.loads(f.read(n))
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size > 8 + n else None
    except FileNotFoundError as exc:
        raise ContractError(f"{uri}: file not found") from exc
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        raise ContractError(f"{uri}: not a readable safetensors file ({exc})") from exc
    meta = header.pop("__metadata__", None) or {}
    tensors = {}
    for name, spec in header.items():
        try:
            dtype = np.dtype(_DTYPES[spec["dtype"]])
            shape = tuple(int(s) for s in spec["shape"])
            start, end = (int(v) for v in spec["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ContractError(f"{uri}: tensor '{name}' has an unreadable header entry {spec!r} "
                                "(dtypes read: " + ", ".join(_DTYPES) + ")") from exc
        count = int(np.prod(shape, dtype=np.int64))
        if end - start != count * dtype.itemsize or start < 0 or 8 + n + end > size:
            raise ContractError(f"{uri}: not a readable safetensors file (tensor '{name}' spans bytes "
                                f"{start}..{end}, which do not hold shape {shape} of {dtype})")
        if count == 0:
            tensors[name] = np.zeros(shape, dtype=dtype)
        else:
            tensors[name] = np.frombuffer(mm, dtype=dtype, count=count, offset=8 + n + start).reshape(shape)
    # the contract's checks (shapes, monotone offsets, finite rows) read the mapped features once, per shard
    validate_tensors(tensors, contract, uri, meta)
    return tensors, meta


def _shard_sources(uri: str) -> tuple[list[tuple[str, str, str | None]], bool]:
    """(features uri, ids uri, features sha256) of every shard of a token-features artifact, in pool order, and
    whether they cover the whole pool (a final artifact) rather than one shard artifact's rows."""
    manifest = read_manifest(uri)
    files = manifest.get("files", {})
    if SHARD_REFS in files:
        root = root_of(uri)
        out = []
        for ref in json.loads(read_bytes(join(uri, SHARD_REFS)))["shards"]:
            shard = join(root, ref["artifact"]) if "artifact" in ref else ref["uri"]
            if not is_committed(shard):
                raise ContractError(f"{uri}: its shard {ref.get('index')} ({shard}) is missing from the store "
                                    "(wiped?); re-run the embedding stage (`sftcurate curate` rebuilds it)")
            shard_files = read_manifest(shard).get("files", {})
            sha = shard_files.get("features.safetensors", {}).get("sha256")
            out.append((join(shard, "features.safetensors"), join(shard, "ids.parquet"), sha))
        return out, True
    if "features.safetensors" in files:  # a single shard artifact stands for its own rows
        return [(join(uri, "features.safetensors"), join(uri, "ids.parquet"),
                 files["features.safetensors"].get("sha256"))], False
    shards = sorted(int(n[len("features-"):-len(".safetensors")]) for n in files
                    if n.startswith("features-") and n.endswith(".safetensors"))
    return [(join(uri, f"features-{k:05d}.safetensors"), join(uri, f"ids-{k:05d}.parquet"),
             files[f"features-{k:05d}.safetensors"].get("sha256")) for k in shards], True


class StoredFeatures(NamedTuple):
    rows: ShardedRows          # [R, d] feature rows (tokens, or factor rows with a sentence rank)
    offsets: np.ndarray        # int64 [N+1] into rows
    ids: list[str]
    tokens: np.ndarray         # int64 [N] loss tokens per sentence (equal to np.diff(offsets) without a rank)
    rank: int | None           # `embedding.sentence_rank` the rows were stored with, None for tokens


def check_stored_rows(tokens: np.ndarray, offsets: np.ndarray, rank: int | None, where: str) -> None:
    """Each sentence holds its tokens' rows, or min(tokens, rank) factor rows."""
    rows = np.diff(offsets)
    if len(tokens) != len(rows) or not np.array_equal(tokens if rank is None else np.minimum(tokens, rank), rows):
        held = "their token rows" if rank is None else f"their rank-{rank} factor rows, min(tokens, {rank})"
        raise ContractError(f"{where}: the sentences' loss token counts do not match {held}")


def read_features_artifact(uri: str) -> tuple[ShardedRows, np.ndarray, list[str]]:
    """(features [T, d] as `ShardedRows` over the memory-mapped shard files, offsets int64 [N+1], ids) of a
    token-features artifact, in pool order. Nothing is concatenated: the rows stay in the shard files."""
    return read_stored_features(uri)[:3]


def read_stored_features(uri: str) -> StoredFeatures:
    """`read_features_artifact` with each sentence's loss tokens and the artifact's sentence rank."""
    blocks, starts, offs, ids, d, base, next_index = [], [], [np.zeros(1, dtype=np.int64)], [], None, 0, 0
    tokens, ranks = [], set()
    sources, whole_pool = _shard_sources(uri)
    if not whole_pool:
        next_index = None  # a single shard artifact: its rows start where the shard starts in the pool
    if not sources:
        raise ContractError(f"{uri}: token-features artifact references no features shard")
    for f_uri, i_uri, sha in sources:
        tensors, meta = map_tensors(f_uri, TOKEN_FEATURES_CONTRACT, sha)
        x, o = tensors["features"], np.asarray(tensors["offsets"], dtype=np.int64)
        rank = int(meta[SENTENCE_RANK]) if SENTENCE_RANK in meta else None
        ranks.add(rank)
        if d is None:
            d = x.shape[1]
        elif x.shape[1] != d:
            raise ContractError(f"{f_uri}: features have d={x.shape[1]} but earlier shards have d={d}; "
                                "the shards come from different models/projections; re-run the embedding stage")
        table = read_table(i_uri, TOKEN_FEATURES_IDS)
        if table.num_rows != len(o) - 1:
            raise ContractError(f"{i_uri}: {table.num_rows} ids but {f_uri} holds {len(o) - 1} examples")
        pidx = np.asarray(table.column("pool_index"))
        if next_index is None:
            next_index = int(pidx[0]) if len(pidx) else 0
        if len(pidx) and not np.array_equal(pidx, np.arange(next_index, next_index + len(pidx))):
            raise ContractError(f"{i_uri}: pool_index does not continue at {next_index}; shards out of order")
        n_tokens = np.asarray(table.column("n_tokens"), dtype=np.int64)
        check_stored_rows(n_tokens, o, rank, f"{i_uri} (n_tokens) and {f_uri} (offsets)")
        tokens.append(n_tokens)
        next_index += len(pidx)
        if x.shape[0]:
            # float32 is what the embedding stage writes; any other float dtype is converted (a copy, this shard)
            blocks.append(x if x.dtype == np.float32 else x.astype(np.float32))
            starts.append(base)
        offs.append(o[1:] + base)
        base += int(o[-1])
        ids.extend(table.column("id").to_pylist())
    if len(ranks) > 1:
        raise ContractError(f"{uri}: its shards were stored with different embedding.sentence_rank values "
                            f"({sorted(ranks, key=str)}); re-run the embedding stage")
    if not blocks:  # every shard empty: one zero-row block keeps the shape [0, d]
        blocks, starts = [np.zeros((0, d), dtype=np.float32)], [0]
    return StoredFeatures(ShardedRows(blocks, np.asarray(starts, dtype=np.int64)), np.concatenate(offs), ids,
                          np.concatenate(tokens), ranks.pop())


def load_token_features_into(uri: str, inputs) -> None:
    """Set inputs.token_features = (features [T, d] float32 rows read in place, offsets int64 [N+1]), pool order."""
    feats, offsets, ids = read_features_artifact(uri)
    check_pool_alignment(uri, ids, inputs.pool, "token features")
    inputs.token_features = (feats, offsets)


def load_sentence_embeddings_into(uri: str, inputs) -> None:
    """Set inputs.sentence_embeddings = the mean token feature of every example (DensitySampling)."""
    stored = read_stored_features(uri)
    check_pool_alignment(uri, stored.ids, inputs.pool, "token features")
    inputs.sentence_embeddings = mean_pool(*token_rows(stored, uri))


def token_rows(stored, where: str) -> tuple:
    """(rows, offsets) of features stored as tokens; features stored as sentence factors are refused: a mean of
    factor rows is not the mean token feature (the curate flow embeds tokens for sentence embeddings)."""
    if stored.rank is not None:
        raise ContractError(f"{where}: holds rank-{stored.rank} sentence factors (embedding.sentence_rank), not "
                            "token features; sentence embeddings need the tokens: embed without sentence_rank")
    return stored.rows, stored.offsets


def load_features_file(path: str, expected_d: int | None = None):
    """(features [T, d] float32, offsets int64 [N+1]) from a `.safetensors` file or a committed token-features
    artifact folder (final or shard), memory-mapped and validated by the TOKEN_FEATURES contract (shapes,
    dtypes, monotone offsets, finite rows). A `features-00000.safetensors` file inside a final artifact of the
    earlier copying layout stands for the whole artifact; a shard artifact's `features.safetensors` is that
    shard's rows only."""
    stored = read_features_file(path, expected_d)
    return stored.rows, stored.offsets


def read_features_file(path: str, expected_d: int | None = None) -> StoredFeatures:
    """`load_features_file` with each sentence's loss tokens and the sentence rank (ids empty for a file)."""
    path = str(path)
    folder = path.rsplit("/", 1)[0] if "/" in path else "."
    if re.search(r"(^|/)features-\d{5}\.safetensors$", path) and exists(join(folder, "_MANIFEST.json")):
        path = folder
    if path.endswith(".safetensors"):
        tensors, meta = map_tensors(path, TOKEN_FEATURES_CONTRACT)
        feats, offsets = tensors["features"], tensors["offsets"]
        rank = int(meta[SENTENCE_RANK]) if SENTENCE_RANK in meta else None
        if rank is not None and "tokens" not in tensors:
            raise ContractError(f"{path}: holds rank-{rank} sentence factors but no 'tokens' tensor (the loss "
                                "tokens of each sentence); re-run the embedding stage")
        tokens = np.asarray(tensors["tokens"] if rank is not None else np.diff(offsets), dtype=np.int64)
        check_stored_rows(tokens, offsets, rank, path)
        name = path.rsplit("/", 1)[-1]
        ids_name = name[: -len(".safetensors")].replace("features", "ids", 1) + ".parquet"
        ids_uri = join(folder, ids_name) if "/" in path else ids_name
        if ids_uri != path and exists(ids_uri):
            table = read_table(ids_uri, TOKEN_FEATURES_IDS)
            if table.num_rows != len(offsets) - 1:
                raise ContractError(f"{ids_uri}: {table.num_rows} ids but {path} holds {len(offsets) - 1} examples")
        if feats.dtype != np.float32:
            feats = feats.astype(np.float32)
    else:
        if not exists(join(path, "_MANIFEST.json")):
            raise ContractError(f"{path}: not a .safetensors file nor a committed token-features artifact folder")
        feats, offsets, _, tokens, rank = read_stored_features(path)
    if feats.shape[1] == 0:
        raise ContractError(f"{path}: 'features' has 0 columns; expected [tokens, d] with d >= 1")
    if expected_d is not None and feats.shape[1] != expected_d:
        raise ContractError(f"{path}: features have d={feats.shape[1]}, expected d={expected_d}")
    return StoredFeatures(feats, np.asarray(offsets, dtype=np.int64), [], tokens, rank)


# ---------------------------------------------------------------- loss trajectories

def load_trajectories_into(uri: str, inputs) -> None:
    """Set inputs.trajectories = (losses, steps) after checking the rows are the pool's, in pool order."""
    losses, steps, ids = load_trajectories_file(uri)
    check_pool_alignment(uri, ids, inputs.pool, "trajectories")
    inputs.trajectories = (losses, steps)


def load_trajectories_file(path: str) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """(losses float32 [N, T], steps int64 [T], ids or None) from a trajectories artifact folder, a
    `.safetensors` file (ids from an `ids.parquet` beside it, when there is one), or a `.npy` [N, T] array."""
    path = str(path)
    if path.endswith(".npy"):
        losses = np.load(io.BytesIO(read_bytes(path)))
        if losses.ndim != 2:
            raise ContractError(f"{path}: expected a 2-d [examples, checkpoints] array, got shape {losses.shape}")
        return losses.astype(np.float32), np.arange(1, losses.shape[1] + 1, dtype=np.int64), None
    if path.endswith(".safetensors"):
        tensors_uri, folder = path, path.rsplit("/", 1)[0] if "/" in path else "."
    else:
        tensors_uri, folder = join(path, "trajectories.safetensors"), path
    tensors, _ = read_tensors(tensors_uri, TRAJECTORIES_CONTRACT)
    ids_uri = join(folder, "ids.parquet")
    ids = None
    if exists(ids_uri):
        table = read_table(ids_uri, TRAJECTORIES_IDS)
        if table.num_rows != tensors["losses"].shape[0]:
            raise ContractError(f"{ids_uri}: {table.num_rows} ids but {tensors['losses'].shape[0]} trajectory rows")
        order = np.argsort(np.asarray(table.column("pool_index")), kind="stable")  # rows into pool order
        ids_list = table.column("id").to_pylist()
        ids = [ids_list[i] for i in order]
        tensors["losses"] = tensors["losses"][order]
    return tensors["losses"].astype(np.float32), tensors["steps"].astype(np.int64), ids

