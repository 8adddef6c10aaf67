"""`sftcurate select` on plain files: build SelectorInputs from whatever the user passes, run, write."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from sftcurate.data_contracts import SELECTION
from sftcurate.infra.store import write_table
from sftcurate.core.selection import selection_table
from sftcurate.core.selectors.base import (
    EXAMPLES, MODEL, SENTENCE_EMBEDDINGS, TOKEN_FEATURES, TRAJECTORIES, Budget, SelectorInputs, get_selector,
    parse_params, selector_class,
)
from sftcurate.data_contracts import UserError


def _placeholder_pool(n: int, ids: list[str] | None = None, sources: list[str] | None = None) -> pa.Table:
    return pa.table({"id": ids or [str(i) for i in range(n)], "source": sources or [""] * n})


def select_from_files(method: str, budget: int | None, token_budget: int | None, seed: int, params: dict,
                      out_path: str, features: str | None = None, trajectories: str | None = None,
                      examples: str | None = None, model: str | None = None) -> dict:
    selector = get_selector(method, parse_params(method, selector_class(method).Params, params, where="--param"))
    needs = set(selector.requires) - {EXAMPLES}
    pool, counts = None, None
    inputs = SelectorInputs(pool=pa.table({"id": pa.array([], pa.string())}), token_counts=np.zeros(0, np.int64))
    if examples:
        from sftcurate.core.ingest import load_pool

        pool = load_pool(examples)
        counts = np.asarray(pool.column("response_tokens"), dtype=np.int64)
    if TOKEN_FEATURES in needs or SENTENCE_EMBEDDINGS in needs:
        if not features:
            raise UserError(f"selector '{method}' needs --features FILE.safetensors")
        from sftcurate.core.embedding import load_features_file

        feats, offsets = load_features_file(features)
        inputs.token_features = (feats, offsets)
        if SENTENCE_EMBEDDINGS in needs:
            from sftcurate.core.embedding import mean_pool

            inputs.sentence_embeddings = mean_pool(feats, offsets)
        counts = np.diff(offsets).astype(np.int64) if counts is None else counts
    if TRAJECTORIES in needs:
        if not trajectories:
            raise UserError(f"selector '{method}' needs --trajectories FILE.safetensors")
        from sftcurate.core.trajectories import load_trajectories_file

        losses, steps, ids = load_trajectories_file(trajectories)
        inputs.trajectories = (losses, steps)
        if pool is None and ids is not None:
            pool = _placeholder_pool(len(ids), ids)
        counts = np.ones(losses.shape[0], dtype=np.int64) if counts is None else counts
    if MODEL in needs:
        if not (model and examples):
            raise UserError(f"selector '{method}' needs --model SPEC and --examples URI")
        inputs.model_spec = model
    if counts is None:
        raise UserError(f"selector '{method}': pass --features, --trajectories or --examples to define the pool")
    if pool is None:
        pool = _placeholder_pool(len(counts))
    if pool.num_rows != len(counts):
        raise UserError(f"the pool has {pool.num_rows} examples but the inputs describe {len(counts)}")
    inputs.pool, inputs.token_counts = pool, counts
    budget_obj = Budget(budget, token_budget)
    budget_obj.check(inputs.size, int(counts.sum()))
    result = selector.select(inputs, budget_obj, seed)
    table = selection_table(result, pool, counts)
    meta = {"method": method, "budget": budget, "token_budget": token_budget, "seed": seed, "params": selector.params.model_dump(mode="json"),
            "pool_size": inputs.size, "selected": table.num_rows,
            "selected_tokens": int(np.asarray(table.column("tokens")).sum()) if table.num_rows else 0,
            "objective": result.objective}
    table = table.replace_schema_metadata({b"sftcurate.selection": json.dumps(meta, default=str).encode()})
    write_table(out_path, table, SELECTION)
    return {**meta, "out": out_path}
