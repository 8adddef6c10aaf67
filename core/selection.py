"""Selection: run a selector by name on committed inputs and commit its selection manifest.

Every selector goes through `run_selection`, so the flow, the CLI and the compare loop treat them alike. What a
selector may require beyond the pool is read into `SelectorInputs` by that requirement's loader
(`core.requirements`); the selection's key holds the code of those loaders, not of how the inputs were made.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from sftcurate.core.ingest import load_pool
from sftcurate.core.requirements import declared, loader_code
from sftcurate.core.selectors.base import (
    MODEL, Budget, SelectionResult, SelectorInputs, SelectorParams,
    get_selector,
)
from sftcurate.core.target import TARGETS
from sftcurate.data_contracts import SELECTION
from sftcurate.data_contracts.manifests import SelectionMeta
from sftcurate.infra.models import model_fingerprint
from sftcurate.infra.stages import Built, build_once, read_meta
from sftcurate.infra.store import join, read_table

KIND = "selection"


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


def build_inputs(pool: pa.Table, requires: tuple[str, ...], input_uris: dict[str, str],
                 model_spec: str | None = None) -> SelectorInputs:
    inputs = SelectorInputs(pool=pool, token_counts=np.asarray(pool.column("response_tokens"), dtype=np.int64))
    for requirement in declared(requires):
        if requirement.name == MODEL:
            inputs.model_spec = model_spec
        elif requirement.load is not None:
            requirement.load(input_uris[requirement.name], inputs)
    return inputs


def run_selection(examples_uri: str, method: str, budget: Budget, seed: int, params: SelectorParams | dict | None,
                  input_uris: dict[str, str], model_spec: str | None = None, store_root: str | None = None) -> Built:
    """The selection artifact of `method` on the pool (computed and committed unless it already is).

    `input_uris` maps each requirement the selector has (token features, trajectories) to its committed
    artifact; `model_spec` is the model of a selector that scores with one (Ask-LLM)."""
    selector = get_selector(method, params)
    # a selector that aims at a target optionally (S2L, FisherSFT) reads it when the run made it
    requires = type(selector).requirements(target=any(name in input_uris for name in TARGETS))

    def build(writer) -> None:
        pool = load_pool(examples_uri)
        inputs = build_inputs(pool, requires, input_uris, model_spec)
        budget.check(inputs.size, int(inputs.token_counts.sum()))
        result = selector.select(inputs, budget, seed)
        if len(set(result.indices)) != len(result.indices):
            raise RuntimeError(f"selector '{method}' picked an example twice")
        table = selection_table(result, pool, inputs.token_counts)
        writer.write_table("selection.parquet", table, SELECTION)
        writer.meta.update({
            "method": method, "budget": budget.examples, "token_budget": budget.tokens, "seed": seed,
            "params": selector.params.model_dump(mode="json"), "inputs": input_uris, "model": model_spec,
            "examples_uri": examples_uri, "pool_size": inputs.size,
            "pool_tokens": int(inputs.token_counts.sum()), "selected": table.num_rows,
            "selected_tokens": int(np.asarray(table.column("tokens")).sum()) if table.num_rows else 0,
            "objective": result.objective, "info": result.info,
        })

    key_params = {"method": method, "budget": budget.examples, "token_budget": budget.tokens, "seed": seed,
                  "params": selector.params,
                  "model": model_fingerprint(model_spec) if MODEL in requires else None}
    upstream = {"examples": examples_uri, **{r: u for r, u in input_uris.items() if r in requires}}
    return build_once(KIND, (__name__, type(selector).__module__, *loader_code(requires)), key_params,
                      build, upstream=upstream, store_root=store_root, meta=SelectionMeta)


def binding_limit(budget: Budget, selected: int, tokens_kept: int, pool_size: int) -> str:
    """Which limit stopped the selection, in words for the summary: the example budget once it is filled, else
    the token budget (no further example fits in it), else the pool itself. With both budgets set, the other
    one's use is said too, so a run never leaves the user guessing which budget they got."""
    examples = f"budget: {selected:,} of {budget.examples:,} examples" if budget.examples is not None else None
    tokens = f"token_budget: {tokens_kept:,} of {budget.tokens:,} tokens" if budget.tokens is not None else None
    if examples and selected >= budget.examples:
        return examples + (f" (token_budget not reached: {tokens_kept:,} of {budget.tokens:,} tokens)"
                           if tokens else "")
    if tokens and selected < pool_size:
        return tokens + (f" (budget not reached: {selected:,} of {budget.examples:,} examples)" if examples else "")
    if selected >= pool_size:
        return f"the pool: all {pool_size:,} examples selected"
    return f"the selector: it stopped at {selected:,} examples ({tokens_kept:,} tokens) within the budget"


def load_selection(selection_uri: str) -> tuple[pa.Table, SelectionMeta]:
    """The selection table and its manifest meta, typed (`meta.method`, `meta.budget`, `meta.objective`)."""
    return read_table(join(selection_uri, "selection.parquet"), SELECTION), selection_meta(selection_uri)


def selection_meta(selection_uri: str) -> SelectionMeta:
    """A selection's manifest meta, typed: `selection_meta(uri).selected_tokens`."""
    return read_meta(selection_uri, SelectionMeta)
