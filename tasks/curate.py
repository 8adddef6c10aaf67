"""Prefect tasks of the `curate` flow: short calls into the library, one per stage, and the producers of what
a selector needs beyond the pool (token features, loss trajectories), mapped over shards on the task runner."""
from __future__ import annotations

from sftcurate.core import embedding, export, ingest, proxy, selection, trajectories
from sftcurate.core.config import CurateConfig, EmbeddingConfig, ProxyConfig, SourceConfig
from sftcurate.core.inputs import LOADERS
from sftcurate.core.selectors.base import MODEL, SENTENCE_EMBEDDINGS, TOKEN_FEATURES, TRAJECTORIES, Budget
from sftcurate.infra import tracking
from sftcurate.infra.models import model_fingerprint
from sftcurate.infra.store import read_manifest
from sftcurate.tasks.common import call, map_tasks, stage_task, task_logger


@stage_task("ingest")
def ingest_task(source: SourceConfig, source_fp: str, tokenizer_spec: str, max_length: int,
                template: str = "auto") -> str:
    return ingest.ingest(source, source_fp, tokenizer_spec, max_length, template)


@stage_task("fit-projection")
def fit_projection_task(examples_uri: str, model_spec: str, d_proj: int, method: str, max_length: int,
                        batch_tokens: int, dtype: str) -> str:
    return embedding.fit_projection(examples_uri, model_spec, model_fingerprint(model_spec), d_proj, method,
                                    max_length, batch_tokens, dtype)


@stage_task("embed-shard")
def embed_shard_task(examples_uri: str, shard_index: int, model_spec: str, max_length: int, emb: EmbeddingConfig,
                     projection_uri: str | None) -> str:
    return embedding.embed_shard(examples_uri, shard_index, emb.shard_size, model_spec, model_fingerprint(model_spec),
                                 max_length, emb.batch_tokens, emb.dtype, projection_uri)


@stage_task("commit-token-features")
def commit_features_task(examples_uri: str, shard_uris: list[str], run_id: str | None = None) -> str:
    uri = embedding.commit_features(examples_uri, shard_uris)
    if run_id:
        meta = read_manifest(uri)["meta"]
        tracking.log_metrics(run_id, {"embedding.tokens": meta["tokens"], "embedding.d": meta["d"] or 0,
                                      "embedding.shards": meta["shards"]})
    return uri


@stage_task("proxy-train")
def proxy_task(examples_uri: str, proxy_spec: str, proxy_cfg: ProxyConfig, max_length: int,
               run_id: str | None = None) -> str:
    """Train (or resume, on retry) the S2L proxy."""
    return proxy.train_proxy(examples_uri, proxy_spec, proxy_cfg, max_length, run_id=run_id)


@stage_task("trajectory-shard")
def trajectory_shard_task(proxy_uri: str, examples_uri: str, shard_index: int, shard_size: int,
                          batch_tokens: int) -> str:
    return trajectories.trajectory_shard(proxy_uri, examples_uri, shard_index, shard_size, batch_tokens)


@stage_task("trajectory-commit")
def trajectory_commit_task(proxy_uri: str, examples_uri: str, shard_uris: list[str],
                           run_id: str | None = None) -> str:
    """Join the shards into the trajectories artifact; its summary goes to MLflow and the Prefect UI."""
    uri = trajectories.commit_trajectories(proxy_uri, examples_uri, shard_uris)
    if run_id:
        trajectories.log_summary(run_id, uri)
    try:
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(key="s2l-trajectories", markdown=trajectories.summary_markdown(uri),
                                 description="S2L proxy loss trajectories")
    except Exception as exc:  # the UI summary is a convenience; never fail the artifact over it
        task_logger("sftcurate.trajectories").warning("could not create the Prefect markdown artifact: %s", exc)
    return uri


@stage_task("curated-records")
def curated_task(examples_uri: str, selection_uri: str) -> str:
    """The selected records as the user gave them, in pick order (what `sftcurate export` writes out)."""
    return export.commit_curated(examples_uri, selection_uri)


@stage_task("select")
def select_task(examples_uri: str, method: str, budget: Budget, seed: int, params, input_uris: dict[str, str],
                model_spec: str | None = None) -> str:
    return selection.run_selection(examples_uri, method, budget, seed, params, input_uris, model_spec)


# ---------------------------------------------------------------- producers of a selector's inputs

def produce_token_features(examples_uri: str, cfg: CurateConfig, run_id: str | None) -> str:
    """Token features of the pool under the target model: shards mapped over the flow's task runner."""
    spec, emb = cfg.models.target, cfg.embedding
    projection_uri = None
    if emb.d_proj:
        projection_uri = call(fit_projection_task, examples_uri, spec, int(emb.d_proj), emb.projection,
                              cfg.models.max_length, emb.batch_tokens, emb.dtype)
    n = ingest.examples_meta(examples_uri)["n_train"]
    shard_uris = map_tasks(embed_shard_task, [(examples_uri, i, spec, cfg.models.max_length, emb, projection_uri)
                                              for i in range(ingest.n_shards(n, emb.shard_size))])
    return call(commit_features_task, examples_uri, shard_uris, run_id)


def produce_trajectories(examples_uri: str, cfg: CurateConfig, run_id: str | None) -> str:
    """Train the proxy, log trajectories shard by shard (mapped), commit them."""
    proxy_uri = call(proxy_task, examples_uri, cfg.models.proxy, cfg.proxy, cfg.models.max_length, run_id)
    n = ingest.examples_meta(examples_uri)["n_train"]
    size = cfg.proxy.shard_size
    shard_uris = map_tasks(trajectory_shard_task, [(proxy_uri, examples_uri, i, size, cfg.proxy.batch_tokens)
                                                   for i in range(ingest.n_shards(n, size))])
    return call(trajectory_commit_task, proxy_uri, examples_uri, shard_uris, run_id)


# requirement -> producer(examples_uri, cfg, run_id) -> artifact URI; the loaders are `core.inputs.LOADERS`
PRODUCERS = {
    TOKEN_FEATURES: produce_token_features,
    SENTENCE_EMBEDDINGS: produce_token_features,
    TRAJECTORIES: produce_trajectories,
}
assert set(PRODUCERS) == set(LOADERS)


def produce_inputs(requires: tuple[str, ...], examples_uri: str, cfg: CurateConfig, run_id: str | None,
                   stage) -> dict[str, str]:
    """The committed artifact of every requirement of a selector (one producer call each, shared ones once)."""
    uris: dict[str, str] = {}
    for requirement in requires:
        if requirement in PRODUCERS:
            with stage(requirement):
                uris[requirement] = PRODUCERS[requirement](examples_uri, cfg, run_id)
    return uris


__all__ = ["ingest_task", "select_task", "curated_task", "produce_inputs", "PRODUCERS", "MODEL"]
