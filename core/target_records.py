"""How the curate flow makes the requirements `target_features` and `target_trajectories` (`core.target`) from
`selection.target`, and their declarations. Imported by `core.requirements` (which every reader of a declaration
imports): it needs ingest, the embedding stage and the proxy, which the selectors, imported by the config, must
not import. The pool's projection is made here too (`pool_projection`), so that the pool and the target are
projected by one artifact made by one call, from the one feature model (`feature_model`).
"""
from __future__ import annotations

import numpy as np

from sftcurate.core import embedding, ingest, proxy, trajectories
from sftcurate.core.selectors.base import FileInput, Production, Requirement, SelectorInputs, Step, declare
from sftcurate.core.inputs import load_features_file, load_trajectories_file, read_features_artifact
from sftcurate.core.target import TARGET_FEATURES, TARGET_TRAJECTORIES, TargetError, checked_target
from sftcurate.data_contracts import ContractError
from sftcurate.infra.models import model_fingerprint


def feature_model(cfg) -> str:
    """The model whose pre-logit features the pool's and the target's token features are (`embedding.model`):
    `target` the target model, `proxy` the S2L proxy's model (`models.proxy`, its weights as that spec loads
    them, not the checkpoints S2L trains), anything else a model spec of its own. The features' key holds the
    model's fingerprint, so features of another model are another artifact. Kept out of `core.embedding`, so
    that choosing the model moves no key of the embedding stage."""
    choice = cfg.embedding.model
    return {"target": cfg.models.target, "proxy": cfg.models.proxy}.get(choice, choice)


def pool_projection(examples_uri: str, cfg) -> str:
    """The projection that reduces the pool's features (and the target's) to `embedding.d_proj` dimensions."""
    spec, emb = feature_model(cfg), cfg.embedding
    return embedding.fit_projection(examples_uri, spec, model_fingerprint(spec), int(emb.d_proj), emb.projection,
                                    cfg.models.max_length, emb.batch_tokens, emb.dtype)


def target_source(cfg):
    """The pool's source settings pointed at the target file: the same columns and format, every record kept
    (no held-out split, no split or group field, no sample, no limit)."""
    if not cfg.selection.target:
        raise TargetError(f"selection.target: selector '{cfg.selection.method}' aims at a target; set "
                          "selection.target to a file of target records (any format source.uri reads)")
    update = {"uri": cfg.selection.target, "heldout_fraction": 0.0, "limit": None, "sample": None,
              "group_field": None, "split_field": None}  # every target record is the target's, whatever it says
    return cfg.source.model_copy(update={k: v for k, v in update.items() if k in type(cfg.source).model_fields})


def ingest_target(examples_uri: str, cfg, run_id: str | None) -> str:
    """The target's examples artifact (tokenized with the pool's model and template)."""
    source = target_source(cfg)
    try:
        return ingest.ingest(source, ingest.source_fingerprint(source), cfg.models.target, cfg.models.max_length,
                             cfg.models.template)
    except ingest.IngestError as exc:
        raise TargetError(f"selection.target: {str(exc).replace('source.uri', 'selection.target')}") from None


def embed_target(examples_uri: str, cfg, target_uri: str, index: int) -> str:
    """All the target's token features in one shard, with the pool's projection (the same artifact the pool's
    features were projected with: `pool_projection` of the pool is a cache hit) and the pool's feature model."""
    spec, emb = feature_model(cfg), cfg.embedding
    projection = pool_projection(examples_uri, cfg) if emb.d_proj else None
    n = ingest.examples_meta(target_uri).n_train
    return embedding.embed_shard(target_uri, index, max(int(n), 1), spec, model_fingerprint(spec),
                                 cfg.models.max_length, emb.batch_tokens, emb.dtype, projection)


def commit_target_features(examples_uri: str, cfg, target_uri: str, shard_uris: list[str],
                           run_id: str | None) -> str:
    return embedding.commit_features(target_uri, shard_uris)


def load_target_features(uri: str, inputs: SelectorInputs) -> None:
    """inputs.extra['target_features'] = (features [T, d], offsets [M+1]) of the committed target artifact."""
    features, offsets, _ = read_features_artifact(uri)
    inputs.extra[TARGET_FEATURES] = checked_target(features, offsets, uri)


def read_target_features_file(path: str, inputs: SelectorInputs):
    try:
        features, offsets = load_features_file(path)
    except ContractError as exc:
        raise TargetError(f"--target-features: {exc}") from None
    inputs.extra[TARGET_FEATURES] = checked_target(features, offsets, f"--target-features {path}")
    return None, None  # the target says nothing about the pool


TARGET_FEATURES_INPUT = declare(Requirement(
    TARGET_FEATURES, load=load_target_features,
    produce=Production(prepare=Step("target-ingest", ingest_target),
                       shards=lambda examples_uri, cfg: 1,
                       shard=Step("embed-target", embed_target),
                       commit=Step("commit-target-features", commit_target_features)),
    from_file=FileInput("target-features", "the target's token features (same model and projection as "
                        "--features): a .safetensors file with `features` and `offsets`, or a token-features "
                        "artifact folder", read_target_features_file)))


# ---------------------------------------------------------------- the target's loss trajectories (S2L)

def pool_proxy(examples_uri: str, cfg) -> str:
    """The proxy trained on the pool (committed by the pool's trajectories, made first: a cache hit here)."""
    return proxy.train_proxy(examples_uri, cfg.models.proxy, cfg.proxy, cfg.models.max_length)


def target_trajectory_shard(examples_uri: str, cfg, target_uri: str, index: int) -> str:
    """The target's losses at every checkpoint of the pool's proxy, all in one shard (target sets are small)."""
    n = ingest.examples_meta(target_uri).n_train
    return trajectories.trajectory_shard(pool_proxy(examples_uri, cfg), target_uri, index, max(int(n), 1),
                                         cfg.proxy.batch_tokens)


def commit_target_trajectories(examples_uri: str, cfg, target_uri: str, shard_uris: list[str],
                               run_id: str | None) -> str:
    return trajectories.commit_trajectories(pool_proxy(examples_uri, cfg), target_uri, shard_uris)


def checked_trajectories(losses, steps, where: str):
    """The target's (losses [M, T], steps [T]), refused in one line when it holds no example."""
    losses = np.asarray(losses, dtype=np.float32)
    if losses.ndim != 2 or losses.shape[0] == 0:
        raise TargetError(f"{where}: the target's trajectories hold no example (shape {losses.shape}); give target "
                          "records with responses")
    return losses, np.asarray(steps, dtype=np.int64)


def load_target_trajectories(uri: str, inputs: SelectorInputs) -> None:
    """inputs.extra['target_trajectories'] = (losses [M, T], steps [T]) of the committed target artifact."""
    losses, steps, _ = load_trajectories_file(uri)
    inputs.extra[TARGET_TRAJECTORIES] = checked_trajectories(losses, steps, uri)


def read_target_trajectories_file(path: str, inputs: SelectorInputs):
    try:
        losses, steps, _ = load_trajectories_file(path)
    except (ContractError, OSError) as exc:
        raise TargetError(f"--target-trajectories: {exc}") from None
    inputs.extra[TARGET_TRAJECTORIES] = checked_trajectories(losses, steps, f"--target-trajectories {path}")
    return None, None  # the target says nothing about the pool


TARGET_TRAJECTORIES_INPUT = declare(Requirement(
    TARGET_TRAJECTORIES, load=load_target_trajectories,
    produce=Production(prepare=Step("target-ingest", ingest_target),
                       shards=lambda examples_uri, cfg: 1,
                       shard=Step("target-trajectories", target_trajectory_shard),
                       commit=Step("commit-target-trajectories", commit_target_trajectories)),
    from_file=FileInput("target-trajectories", "the target's loss trajectories at the same proxy checkpoints as "
                        "--trajectories (the same formats)", read_target_trajectories_file)))
