"""A selector and the input it needs, declared in this one module and nowhere else (tests only).

`longest` keeps the examples with the longest responses, measured in characters: a new requirement,
`response_chars`, that the curate flow makes in shards of the pool (a stage per shard, then a commit joining
them), a selection reads from the committed artifact, and `sftcurate select longest --chars FILE.npy` reads
from a file. Importing this module is all it takes for the config, the flow and the CLI to know both.
"""
from __future__ import annotations

import io

import numpy as np
from pydantic import Field

from sftcurate.core.ingest import examples_meta, load_pool, n_shards, shard_bounds
from sftcurate.core.selectors.base import (EXAMPLES, Budget, FileInput, Production, Requirement, Selector,
                                           SelectionResult, SelectorInputs, SelectorParams, Step, check_pool_alignment,
                                           declare, fill_in_order, register)
from sftcurate.infra.stages import build_once
from sftcurate.infra.store import join, read_bytes, read_manifest

RESPONSE_CHARS = "response_chars"
SHARD_SIZE = 7  # small, so that a test pool makes several shards


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def chars_shard(examples_uri: str, cfg, prepared, index: int) -> str:
    def build(writer) -> None:
        pool = load_pool(examples_uri)
        lo, hi = shard_bounds(pool.num_rows, index, SHARD_SIZE)
        writer.write_bytes("chars.npy", _npy(np.array([len(r) for r in pool.column("response").to_pylist()[lo:hi]],
                                                      dtype=np.int64)))
        writer.meta["ids"] = pool.column("id").to_pylist()[lo:hi]

    return build_once("response_chars_shard", __name__, {"index": index, "size": SHARD_SIZE}, build,
                      upstream={"examples": examples_uri})


def commit_chars(examples_uri: str, cfg, prepared, shard_uris: list[str], run_id) -> str:
    def build(writer) -> None:
        chars = [np.load(io.BytesIO(read_bytes(join(uri, "chars.npy")))) for uri in shard_uris]
        writer.write_bytes("chars.npy", _npy(np.concatenate(chars)))
        writer.meta["ids"] = [i for uri in shard_uris for i in read_manifest(uri)["meta"]["ids"]]

    return build_once(RESPONSE_CHARS, __name__, {}, build, upstream={"examples": examples_uri,
                                                                    "shards": list(shard_uris)})


def load_chars(uri: str, inputs: SelectorInputs) -> None:
    check_pool_alignment(uri, read_manifest(uri)["meta"]["ids"], inputs.pool, "response lengths")
    inputs.extra[RESPONSE_CHARS] = np.load(io.BytesIO(read_bytes(join(uri, "chars.npy"))))


def read_chars_file(path: str, inputs: SelectorInputs):
    chars = np.load(io.BytesIO(read_bytes(path)))
    inputs.extra[RESPONSE_CHARS] = chars
    return None, np.ones(len(chars), dtype=np.int64)


RESPONSE_CHARS_INPUT = declare(Requirement(
    RESPONSE_CHARS, load=load_chars,
    produce=Production(shards=lambda examples_uri, cfg: n_shards(examples_meta(examples_uri).n_train, SHARD_SIZE),
                       shard=Step("response-chars-shard", chars_shard),
                       commit=Step("response-chars-commit", commit_chars)),
    from_file=FileInput("chars", "a .npy array: each example's response length in characters", read_chars_file)))


class LongestParams(SelectorParams):
    min_chars: int = Field(0, ge=0, description="only responses at least this long")


@register
class LongestSelector(Selector):
    """Longest: the examples with the longest responses (a test-only selector)."""

    name = "longest"
    requires = (EXAMPLES, RESPONSE_CHARS)
    Params = LongestParams

    def select(self, inputs: SelectorInputs, budget: Budget, seed: int) -> SelectionResult:
        chars = inputs.extra[RESPONSE_CHARS]
        order = [i for i in np.lexsort((np.arange(len(chars)), -chars)) if chars[i] >= self.params.min_chars]
        picks = fill_in_order(np.asarray(order, dtype=np.int64), inputs.token_counts, budget)
        return SelectionResult(indices=picks, scores=[float(chars[i]) for i in picks])
