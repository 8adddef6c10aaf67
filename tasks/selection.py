"""Selection: run a selector by name on committed inputs and commit its selection manifest.

Every selector goes through `run_selection`, so the flow, the CLI and the compare loop treat them alike.
"""
from __future__ import annotations

import importlib
import json

import numpy as np
import pyarrow as pa
from prefect import task

from data_contracts import SELECTION
from infra.hashing import code_fingerprint, fingerprint
from infra.store import ArtifactStore, join, read_manifest, read_table
from tasks.common import TASK_DEFAULTS
from tasks.selectors.base import MODEL, Budget, SelectionResult, SelectorInputs, get_selector

# requirement -> module exposing produce(examples_uri, cfg, run_id) and load_into(uri, inputs)
PROVIDERS = {
    "token_features": "tasks.embedding",
    "sentence_embeddings": "tasks.embedding",
    "trajectories": "tasks.trajectories",
}


def provider(requirement: str):
    return importlib.import_module(PROVIDERS[requirement])


def selection_table(result: SelectionResult, pool: pa.Table, token_counts: np.ndarray) -> pa.Table:
    idx = np.asarray(result.indices, dtype=np.int64)
    ids = pool.column("id").to_pylist()
    n = len(idx)

    def optional(values, dtype):
        return pa.array([None] * n, type=dtype) if values is None else pa.array(values, type=dtype)

    return pa.table({
        "index": idx, "rank": np.arange(n, dtype=np.int64), "id": [ids[i] for i in idx],
        "tokens": token_counts[idx] if n else np.zeros(0, dtype=np.int64),
        "gain": optional(result.gains, pa.float64()), "score": optional(result.scores, pa.float64()),
        "cluster": optional(result.clusters, pa.int64()),
    })


def build_inputs(pool: pa.Table, requires: tuple[str, ...], input_uris: dict[str, str]) -> SelectorInputs:
    inputs = SelectorInputs(pool=pool, token_counts=np.asarray(pool.column("response_tokens"), dtype=np.int64))
    for requirement in requires:
        if requirement == MODEL:
            inputs.model_spec = input_uris[MODEL]
        elif requirement in PROVIDERS:
            load = getattr(provider(requirement), "load_sentence_embeddings_into" if requirement ==
                           "sentence_embeddings" else "load_into")
            load(input_uris[requirement], inputs)
    return inputs


def run_selection(examples_uri: str, method: str, budget: Budget, seed: int, params: dict,
                  input_uris: dict[str, str], store_root: str | None = None) -> str:
    from tasks.ingest import examples_meta, load_pool

    selector = get_selector(method, **params)
    pool_fp = examples_meta(examples_uri)["fingerprint"]
    store = ArtifactStore(store_root)
    module = type(selector).__module__
    key = fingerprint(pool_fp, method, budget.examples, budget.tokens, seed,
                      params, input_uris,
                      code_fingerprint(module, "tasks.selection", "tasks.selectors.base", *selector.code_modules))
    existing = store.committed("selection", key)
    if existing:
        return existing
    pool = load_pool(examples_uri)
    inputs = build_inputs(pool, selector.requires, input_uris)
    budget.check(inputs.size, int(inputs.token_counts.sum()))
    result = selector.select(inputs, budget, seed)
    if len(set(result.indices)) != len(result.indices):
        raise RuntimeError(f"selector '{method}' picked an example twice")
    table = selection_table(result, pool, inputs.token_counts)
    writer = store.begin("selection", key)
    writer.write_table("selection.parquet", table, SELECTION)
    writer.meta.update({
        "method": method, "budget": budget.examples, "token_budget": budget.tokens, "seed": seed,
        "params": params, "inputs": input_uris, "examples_uri": examples_uri,
        "pool_fingerprint": pool_fp, "pool_size": inputs.size,
        "pool_tokens": int(inputs.token_counts.sum()), "selected": table.num_rows,
        "selected_tokens": int(np.asarray(table.column("tokens")).sum()) if table.num_rows else 0,
        "objective": result.objective, "info": result.info,
    })
    return writer.commit()


@task(name="select", **TASK_DEFAULTS)
def select_task(examples_uri: str, method: str, budget: int | None, token_budget: int | None, seed: int,
                params_json: str, input_uris_json: str, store_root: str | None = None) -> str:
    return run_selection(examples_uri, method, Budget(budget, token_budget), seed, json.loads(params_json),
                         json.loads(input_uris_json), store_root)


def load_selection(selection_uri: str) -> tuple[pa.Table, dict]:
    """The selection table and its manifest meta (method, budget, objective, ...)."""
    return read_table(join(selection_uri, "selection.parquet"), SELECTION), read_manifest(selection_uri)["meta"]
