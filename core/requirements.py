"""The built-in requirements of selectors, each declared once (`core.selectors.base.Requirement`): how a
selection reads it, how `sftcurate select` reads it from a file, and how the curate flow makes it.

| requirement | made by (Prefect tasks, `tasks.curate.produce`) | read by |
|---|---|---|
| `token_features` | fit-projection (with `embedding.d_proj`), embed-shard per shard, commit-token-features | FisherSFT |
| `sentence_embeddings` | the `token_features` artifact (made once); a selection reads its mean per example | Density |
| `trajectories` | proxy-train, trajectory-shard per shard, trajectory-commit | S2L |
| `model` | nothing: the target model's spec | Ask-LLM |
| `target_features` | target-ingest, embed-target, commit-target-features | similarity, fishersft_target, FisherSFT |
| `target_trajectories` | target-ingest, target-trajectories, commit-target-trajectories | S2L with a target |

The two target rows are declared in `core.target_records`; FisherSFT reads `target_features` only with a target.

Token features (and the target's) come from `embedding.model`: the target model by default, `proxy` for
`models.proxy`, or any model spec (`feature_model`); the target model is then only fine-tuned.

This module sits above the selectors and the stages that make their inputs (`core.embedding`,
`core.trajectories`, `core.proxy`); a selection's key reaches only the loader of each of its requirements
(`core.selection`), never how the input was made: the input's own key covers that.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from sftcurate.core import embedding, ingest, proxy, trajectories
from sftcurate.core.target import reads_target
from sftcurate.core.target_records import feature_model, pool_projection  # also declares the target's inputs
from sftcurate.core.inputs import (load_sentence_embeddings_into, load_token_features_into, load_trajectories_file,
                                   load_trajectories_into, mean_pool, read_features_file, token_rows)
from sftcurate.core.selectors.base import (EXAMPLES, MODEL, REQUIREMENTS, SENTENCE_EMBEDDINGS, TOKEN_FEATURES,
                                           TRAJECTORIES, FileInput, Production, Requirement, SelectorInputs,
                                           SelectorParamError, Step, Summary, declare, selector_class)
from sftcurate.infra import tracking
from sftcurate.infra.models import model_fingerprint
from sftcurate.data_contracts.manifests import TokenFeaturesMeta
from sftcurate.infra.stages import read_meta


def declared(requires) -> list[Requirement]:
    """The declarations of a selector's requirements beyond the pool, in its order."""
    return [requirement(name) for name in requires if name != EXAMPLES]


def selection_requires(selection) -> tuple[str, ...]:
    """What a run of `selection` (a `SelectionConfig`) makes and reads, in order: the selector's requirements,
    with those it reads of a target when `selection.target` is set."""
    cls = selector_class(selection.method)
    return cls.requirements(target=bool(selection.target) and reads_target(cls))


def loader_code(requires) -> tuple[str, ...]:
    """What a selection's key holds of its inputs: the code of each loader (`module:function`), not how the
    inputs were made (their own keys say that). The declarations here bind names so that a key reaching
    `requirement` reaches none of them."""
    return tuple(f"{r.load.__module__}:{r.load.__qualname__}" for r in declared(requires) if r.load is not None)


def requirement(name: str) -> Requirement:
    """The declaration of requirement `name` (the built-in ones are declared below, others where they live)."""
    if name not in REQUIREMENTS:
        raise SelectorParamError(f"requirement '{name}' is declared nowhere; declare it with "
                                 "core.selectors.base.declare (known: " + ", ".join(sorted(REQUIREMENTS)) + ")")
    return REQUIREMENTS[name]


def pool_shards(examples_uri: str, shard_size: int) -> int:
    return ingest.n_shards(ingest.examples_meta(examples_uri).n_train, shard_size)


# ---------------------------------------------------------------- token features (and sentence embeddings)

def fit_pool_projection(examples_uri: str, cfg, run_id: str | None) -> str:
    """The projection that reduces the features to `embedding.d_proj` dimensions (the target's too)."""
    return pool_projection(examples_uri, cfg)


def embed_pool_shard(examples_uri: str, cfg, projection_uri: str | None, index: int) -> str:
    """One shard of the pool's features as FisherSFT reads them: each sentence's rank-r factor with
    `embedding.sentence_rank` r, else its tokens."""
    return embed_pool_tokens(examples_uri, cfg, projection_uri, index, cfg.embedding.sentence_rank)


def embed_pool_tokens(examples_uri: str, cfg, projection_uri: str | None, index: int,
                      sentence_rank: int | None = None) -> str:
    """One shard of the pool's token features (the sentence embeddings' step: always tokens)."""
    spec, emb = feature_model(cfg), cfg.embedding
    return embedding.embed_shard(examples_uri, index, emb.shard_size, spec, model_fingerprint(spec),
                                 cfg.models.max_length, emb.batch_tokens, emb.dtype, projection_uri,
                                 sentence_rank=sentence_rank)


# what a pool stored as sentence factors reports (`core.fisher_features.factor_summary`)
FACTOR_METRICS = ("sentence_rank", "feature_rows", "kept_energy_min", "kept_energy_mean")


def commit_pool_features(examples_uri: str, cfg, projection_uri: str | None, shard_uris: list[str],
                         run_id: str | None) -> str:
    uri = embedding.commit_features(examples_uri, shard_uris)
    if run_id:
        meta = read_meta(uri, TokenFeaturesMeta)
        tracking.log_metrics(run_id, {"embedding.tokens": meta.tokens, "embedding.d": meta.d or 0,
                                      "embedding.shards": meta.shards,
                                      **{f"embedding.{k}": v for k in FACTOR_METRICS
                                         if (v := getattr(meta, k)) is not None}})
    return uri


TOKEN_FEATURES_PRODUCTION = Production(
    prepare=Step("fit-projection", fit_pool_projection, when=lambda cfg: bool(cfg.embedding.d_proj)),
    shards=lambda examples_uri, cfg: pool_shards(examples_uri, cfg.embedding.shard_size),
    shard=Step("embed-shard", embed_pool_shard),
    commit=Step("commit-token-features", commit_pool_features),
)


# A sentence embedding is the mean of the sentence's token features, which its rank-r factor does not keep: the
# sentence embeddings' production embeds tokens whatever `embedding.sentence_rank` says (without a rank both
# productions make the same shards, under the same keys, built once).
SENTENCE_EMBEDDINGS_PRODUCTION = replace(TOKEN_FEATURES_PRODUCTION, shard=Step("embed-shard", embed_pool_tokens))


def read_token_features(path: str, inputs: SelectorInputs):
    stored = read_features_file(path)
    inputs.token_features = (stored.rows, stored.offsets)
    return None, stored.tokens  # a sentence stored as its factor still costs its loss tokens


def read_sentence_embeddings(path: str, inputs: SelectorInputs):
    stored = read_features_file(path)
    inputs.sentence_embeddings = mean_pool(*token_rows(stored, path))
    return None, stored.tokens


FEATURES_HELP = ("token features: a .safetensors file with `features` and `offsets`, or a token-features "
                 "artifact folder")

TOKEN_FEATURES_INPUT = declare(Requirement(
    TOKEN_FEATURES, load=load_token_features_into, produce=TOKEN_FEATURES_PRODUCTION,
    from_file=FileInput("features", FEATURES_HELP, read_token_features)))
SENTENCE_EMBEDDINGS_INPUT = declare(Requirement(
    SENTENCE_EMBEDDINGS, load=load_sentence_embeddings_into, produce=SENTENCE_EMBEDDINGS_PRODUCTION,
    from_file=FileInput("features", FEATURES_HELP, read_sentence_embeddings)))


# ---------------------------------------------------------------- loss trajectories

def train_pool_proxy(examples_uri: str, cfg, run_id: str | None) -> str:
    """Train (or resume, on retry) the S2L proxy on the pool."""
    return proxy.train_proxy(examples_uri, cfg.models.proxy, cfg.proxy, cfg.models.max_length, run_id=run_id)


def trajectory_pool_shard(examples_uri: str, cfg, proxy_uri: str, index: int) -> str:
    return trajectories.trajectory_shard(proxy_uri, examples_uri, index, cfg.proxy.shard_size,
                                         cfg.proxy.batch_tokens)


def commit_pool_trajectories(examples_uri: str, cfg, proxy_uri: str, shard_uris: list[str],
                             run_id: str | None) -> str:
    """Join the shards into the trajectories artifact; its summary goes to MLflow."""
    uri = trajectories.commit_trajectories(proxy_uri, examples_uri, shard_uris)
    if run_id:
        trajectories.log_summary(run_id, uri)
    return uri


def read_trajectories(path: str, inputs: SelectorInputs):
    losses, steps, ids = load_trajectories_file(path)
    inputs.trajectories = (losses, steps)
    return ids, np.ones(losses.shape[0], dtype=np.int64)


TRAJECTORIES_INPUT = declare(Requirement(
    TRAJECTORIES, load=load_trajectories_into,
    produce=Production(prepare=Step("proxy-train", train_pool_proxy),
                       shards=lambda examples_uri, cfg: pool_shards(examples_uri, cfg.proxy.shard_size),
                       shard=Step("trajectory-shard", trajectory_pool_shard),
                       commit=Step("trajectory-commit", commit_pool_trajectories),
                       summary=Summary("s2l-trajectories", "S2L proxy loss trajectories",
                                       trajectories.summary_markdown)),
    from_file=FileInput("trajectories", "loss trajectories: a trajectories artifact folder, a .safetensors file "
                        "with `losses` and `steps`, or a .npy array of shape (examples, checkpoints)",
                        read_trajectories)))


# ---------------------------------------------------------------- the target model (a spec, not an artifact)

def read_model_spec(spec: str, inputs: SelectorInputs):
    inputs.model_spec = spec
    return None, None


MODEL_INPUT = declare(Requirement(MODEL, from_file=FileInput("model", "model spec to score with (needs --examples)",
                                                            read_model_spec, needs_examples=True)))

