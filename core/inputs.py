"""Readers of what selectors need beyond the pool: token features (FisherSFT, DensitySampling) and loss
trajectories (S2L), from committed artifacts or from plain files, checked against the pool they claim to cover.

Kept apart from the stages that make them (`embedding`, `trajectories`) so that selecting depends only on
how inputs are read, not on how they were computed.
"""
from __future__ import annotations

import io
import re

import numpy as np

from sftcurate.core.selectors.base import SENTENCE_EMBEDDINGS, TOKEN_FEATURES, TRAJECTORIES, check_pool_alignment
from sftcurate.data_contracts import (
    TOKEN_FEATURES as TOKEN_FEATURES_CONTRACT, TOKEN_FEATURES_IDS, TRAJECTORIES as TRAJECTORIES_CONTRACT,
    TRAJECTORIES_IDS, ContractError,
)
from sftcurate.infra.store import exists, join, read_bytes, read_manifest, read_table, read_tensors


def mean_pool(features: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """One vector per example: the mean of its token features (zeros for an example with none)."""
    offsets = np.asarray(offsets, dtype=np.int64)
    counts = np.diff(offsets)
    x = np.asarray(features, dtype=np.float64)
    cs = np.concatenate([np.zeros((1, x.shape[1])), np.cumsum(x, axis=0)])
    sums = cs[offsets[1:]] - cs[offsets[:-1]]
    return (sums / np.maximum(counts, 1)[:, None]).astype(np.float32)


# ---------------------------------------------------------------- token features

def _shard_names(uri: str) -> list[int]:
    manifest = read_manifest(uri)
    names = sorted(manifest.get("files", {}))
    return sorted(int(n[len("features-"):-len(".safetensors")]) for n in names
                  if n.startswith("features-") and n.endswith(".safetensors"))


def read_features_artifact(uri: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(features float32, offsets int64, ids) of every shard of a token-features artifact, in pool order."""
    feats, offs, ids, d, base, next_index = [], [0], [], None, 0, 0
    shards = _shard_names(uri)
    if not shards:
        raise ContractError(f"{uri}: token-features artifact has no features-*.safetensors shard")
    for k in shards:
        f_uri, i_uri = join(uri, f"features-{k:05d}.safetensors"), join(uri, f"ids-{k:05d}.parquet")
        tensors, _ = read_tensors(f_uri, TOKEN_FEATURES_CONTRACT)
        x, o = tensors["features"], tensors["offsets"]
        if d is None:
            d = x.shape[1]
        elif x.shape[1] != d:
            raise ContractError(f"{f_uri}: features have d={x.shape[1]} but earlier shards have d={d}; "
                                "the shards come from different models/projections; re-run the embedding stage")
        table = read_table(i_uri, TOKEN_FEATURES_IDS)
        if table.num_rows != len(o) - 1:
            raise ContractError(f"{i_uri}: {table.num_rows} ids but {f_uri} holds {len(o) - 1} examples")
        pidx = np.asarray(table.column("pool_index"))
        if len(pidx) and not np.array_equal(pidx, np.arange(next_index, next_index + len(pidx))):
            raise ContractError(f"{i_uri}: pool_index does not continue at {next_index}; shards out of order")
        if not np.array_equal(np.asarray(table.column("n_tokens")), np.diff(o)):
            raise ContractError(f"{i_uri}: n_tokens disagree with the offsets of {f_uri}")
        next_index += len(pidx)
        feats.append(x.astype(np.float32, copy=False))
        offs.append(o[1:] + base)
        base += int(o[-1])
        ids.extend(table.column("id").to_pylist())
    return np.concatenate(feats), np.concatenate([np.asarray(a, dtype=np.int64).reshape(-1) for a in offs]), ids


def load_token_features_into(uri: str, inputs) -> None:
    """Set inputs.token_features = (features float32 [T, d], offsets int64 [N+1]) in pool order."""
    feats, offsets, ids = read_features_artifact(uri)
    check_pool_alignment(uri, ids, inputs.pool, "token features")
    inputs.token_features = (feats, offsets)


def load_sentence_embeddings_into(uri: str, inputs) -> None:
    """Set inputs.sentence_embeddings = the mean token feature of every example (DensitySampling)."""
    feats, offsets, ids = read_features_artifact(uri)
    check_pool_alignment(uri, ids, inputs.pool, "token features")
    inputs.sentence_embeddings = mean_pool(feats, offsets)


def load_features_file(path: str, expected_d: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(features float32 [T, d], offsets int64 [N+1]) from a `.safetensors` file or a token-features artifact
    folder, validated by the TOKEN_FEATURES contract (shapes, dtypes, monotone offsets, finite rows). A shard
    file of a committed artifact (`.../features-00000.safetensors`) stands for the whole artifact."""
    path = str(path)
    folder = path.rsplit("/", 1)[0] if "/" in path else "."
    if re.search(r"(^|/)features-\d{5}\.safetensors$", path) and exists(join(folder, "_MANIFEST.json")):
        path = folder
    if path.endswith(".safetensors"):
        tensors, _ = read_tensors(path, TOKEN_FEATURES_CONTRACT)
        feats, offsets = tensors["features"], tensors["offsets"]
        ids_uri = path[: -len(".safetensors")].replace("features", "ids", 1) + ".parquet"
        if "/" in path:
            folder, name = path.rsplit("/", 1)
            ids_uri = join(folder, name[: -len(".safetensors")].replace("features", "ids", 1) + ".parquet")
        if ids_uri != path and exists(ids_uri):
            table = read_table(ids_uri, TOKEN_FEATURES_IDS)
            if table.num_rows != len(offsets) - 1:
                raise ContractError(f"{ids_uri}: {table.num_rows} ids but {path} holds {len(offsets) - 1} examples")
    else:
        if not exists(join(path, "_MANIFEST.json")):
            raise ContractError(f"{path}: not a .safetensors file nor a committed token-features artifact folder")
        feats, offsets, _ = read_features_artifact(path)
    if feats.shape[1] == 0:
        raise ContractError(f"{path}: 'features' has 0 columns; expected [tokens, d] with d >= 1")
    if expected_d is not None and feats.shape[1] != expected_d:
        raise ContractError(f"{path}: features have d={feats.shape[1]}, expected d={expected_d}")
    return feats.astype(np.float32, copy=False), offsets.astype(np.int64, copy=False)


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


# requirement -> loader(artifact URI, inputs) that fills `inputs` after checking the rows are the pool's
LOADERS = {
    TOKEN_FEATURES: load_token_features_into,
    SENTENCE_EMBEDDINGS: load_sentence_embeddings_into,
    TRAJECTORIES: load_trajectories_into,
}
