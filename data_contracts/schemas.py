"""Arrow schemas (versioned) for tabular artifacts.

A contract is a name, a version and an Arrow schema. Writers call `validate_table` before anything touches
the store and readers call it after loading, so a file written by another version or edited by hand is
refused with a message that names the file and the offending column.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

from sftcurate.data_contracts.errors import UserError


class ContractError(UserError):
    """An artifact does not match its data contract."""


@dataclass(frozen=True)
class Contract:
    name: str
    version: int
    schema: pa.Schema
    non_null: tuple[str, ...] = field(default_factory=tuple)

    def metadata(self) -> dict[bytes, bytes]:
        return {b"sftcurate.contract": self.name.encode(), b"sftcurate.version": str(self.version).encode()}


def validate_table(table: pa.Table, contract: Contract, where: str = "<memory>") -> pa.Table:
    """Check `table` against `contract`; return it cast to the exact schema (column order, types, metadata)."""
    meta = table.schema.metadata or {}
    found_name = meta.get(b"sftcurate.contract")
    if found_name is not None and found_name.decode() != contract.name:
        raise ContractError(f"{where}: is a '{found_name.decode()}' artifact, expected '{contract.name}'")
    found_version = meta.get(b"sftcurate.version")
    if found_version is not None and int(found_version) != contract.version:
        raise ContractError(
            f"{where}: '{contract.name}' schema version {found_version.decode()} but this sftcurate reads "
            f"version {contract.version}; re-run the task that produced it"
        )
    columns = {}
    for f in contract.schema:
        if f.name not in table.column_names:
            raise ContractError(f"{where}: missing column '{f.name}' required by contract '{contract.name}'")
        col = table.column(f.name)
        if not col.type.equals(f.type):
            try:
                col = col.cast(f.type, safe=True)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise ContractError(
                    f"{where}: column '{f.name}' has type {col.type}, contract '{contract.name}' needs {f.type}"
                ) from exc
        if f.name in contract.non_null and col.null_count:
            raise ContractError(
                f"{where}: column '{f.name}' has {col.null_count} null value(s); contract '{contract.name}' forbids nulls"
            )
        columns[f.name] = col
    schema = contract.schema.with_metadata({**meta, **contract.metadata()})
    return pa.Table.from_arrays(list(columns.values()), schema=schema)


EXAMPLES = Contract(
    name="examples",
    version=4,
    schema=pa.schema([
        ("id", pa.string()),            # stable content hash; drives the held-out split (unless source.split_field)
        ("prompt", pa.string()),        # "" for plain text
        ("response", pa.string()),      # the answer as the user wrote it (cut when source.too_long cut it)
        ("turns", pa.string()),         # the rendered text every stage trains on (core.training_text): its segments
        ("source", pa.string()),        # file / dataset / builtin the row came from (used for stratification)
        ("group", pa.string()),         # the record's group for per-group metrics: source.group_field, or source
        ("origin", pa.string()),        # file (or data set) and line / row of the record
        ("format", pa.string()),        # the record's format (text, prompt_response, alpaca, messages, sharegpt)
        ("raw", pa.string()),           # the record exactly as read, as JSON (what export gives back)
        ("prompt_tokens", pa.int64()),   # context tokens of the rendered text (template markup and prompts)
        ("response_tokens", pa.int64()),  # its loss tokens: what a token budget counts
        ("split", pa.string()),         # "train" (the pool) or "heldout"
    ]),
    non_null=("id", "prompt", "response", "turns", "source", "group", "origin", "format", "raw", "prompt_tokens",
              "response_tokens", "split"),
)

SELECTION = Contract(
    name="selection",
    version=1,
    schema=pa.schema([
        ("index", pa.int64()),          # 0-based position in the pool (the train split, in pool order)
        ("rank", pa.int64()),           # 0-based pick order
        ("id", pa.string()),            # example id, so a selection can be joined back without the pool order
        ("tokens", pa.int64()),         # loss tokens of the pick (what the user pays for)
        ("gain", pa.float64()),         # marginal objective gain of the pick, null when the method has none
        ("score", pa.float64()),        # method score (Ask-LLM probability, density weight), null when none
        ("cluster", pa.int64()),        # S2L cluster of the pick, null when the method has none
    ]),
    non_null=("index", "rank", "id", "tokens"),
)

TOKEN_FEATURES_IDS = Contract(
    name="token_features_ids",
    version=1,
    schema=pa.schema([("id", pa.string()), ("pool_index", pa.int64()), ("n_tokens", pa.int64())]),
    non_null=("id", "pool_index", "n_tokens"),
)

TRAJECTORIES_IDS = Contract(
    name="trajectories_ids",
    version=1,
    schema=pa.schema([("id", pa.string()), ("pool_index", pa.int64()), ("source", pa.string())]),
    non_null=("id", "pool_index"),
)

JUDGMENTS = Contract(
    name="judgments",
    version=2,
    schema=pa.schema([
        ("prompt_id", pa.string()),
        ("method_a", pa.string()),      # kept in the artifact, never shown to the judge
        ("method_b", pa.string()),
        ("order", pa.string()),         # "ab" (a in slot 1) or "ba"
        ("verdict", pa.string()),       # "first", "second", "error"
        ("winner", pa.string()),        # method name, "tie" or "error" after mapping the slot back
        ("p_first", pa.float64()),      # judge probability of slot 1 where the backend gives one
        ("error", pa.string()),
        ("chars_a", pa.int64()),        # length of method A's text (length bias is reported from these)
        ("chars_b", pa.int64()),
    ]),
    non_null=("prompt_id", "method_a", "method_b", "order", "verdict", "winner"),
)

GENERATIONS = Contract(
    name="generations",
    version=1,
    schema=pa.schema([
        ("prompt_id", pa.string()),     # held-out example id
        ("prompt", pa.string()),        # what the model saw (the prompt, or a passage's first words)
        ("reference", pa.string()),     # the held-out response / rest of the passage
        ("text", pa.string()),          # the model's continuation (new text only)
    ]),
    non_null=("prompt_id", "prompt", "reference", "text"),
)

HELDOUT_LOSSES = Contract(
    name="heldout_losses",
    version=1,
    schema=pa.schema([
        ("id", pa.string()),            # held-out example id
        ("group", pa.string()),         # its group (examples contract)
        ("loss_sum", pa.float64()),     # summed token loss over its loss tokens
        ("tokens", pa.int64()),         # its loss tokens
    ]),
    non_null=("id", "group", "loss_sum", "tokens"),
)

EVAL_RESULTS = Contract(
    name="eval_results",
    version=3,
    schema=pa.schema([
        ("method", pa.string()),
        ("budget", pa.int64()),
        ("heldout_loss", pa.float64()),       # token-weighted, mean over replicates
        ("heldout_ppl", pa.float64()),
        ("loss_ci_low", pa.float64()),        # 95% over held-out examples and replicates
        ("loss_ci_high", pa.float64()),
        ("delta_vs_uniform", pa.float64()),   # held-out loss minus uniform's at the budget (negative = better)
        ("delta_ci_low", pa.float64()),       # 95% paired interval
        ("delta_ci_high", pa.float64()),
        ("verdict", pa.string()),             # better / worse only when the interval excludes 0
        ("worst_group", pa.string()),
        ("worst_group_loss", pa.float64()),
        ("groups_covered", pa.int64()),       # pool groups with at least one pick
        ("groups", pa.int64()),
        ("share_distance", pa.float64()),     # total variation between the picks' and the pool's group shares
        ("trained_tokens", pa.float64()),     # loss tokens the fine-tune trained on (mean over replicates)
        ("steps", pa.float64()),
        ("replicates", pa.int64()),
        ("win_rate_vs_uniform", pa.float64()),
        ("win_rate_ci_low", pa.float64()),
        ("win_rate_ci_high", pa.float64()),
        ("wins", pa.int64()),
        ("losses", pa.int64()),
        ("ties", pa.int64()),
        ("errors", pa.int64()),
        ("balanced_loss", pa.float64()),      # mean over held-out groups of each group's loss (groups weigh alike)
        ("balanced_ci_low", pa.float64()),
        ("balanced_ci_high", pa.float64()),
        ("balanced_delta", pa.float64()),     # minus uniform's, paired; negative = better
        ("balanced_delta_ci_low", pa.float64()),
        ("balanced_delta_ci_high", pa.float64()),
        ("balanced_verdict", pa.string()),
        ("answer_match", pa.float64()),       # share of held-out prompts whose generation passes the check
        ("answer_ci_low", pa.float64()),
        ("answer_ci_high", pa.float64()),
        ("answer_delta", pa.float64()),       # minus uniform's, paired over prompts; positive = better
        ("answer_delta_ci_low", pa.float64()),
        ("answer_delta_ci_high", pa.float64()),
        ("answer_verdict", pa.string()),
    ]),
    non_null=("method", "budget"),
)

CONTRACTS = {c.name: c for c in (EXAMPLES, SELECTION, TOKEN_FEATURES_IDS, TRAJECTORIES_IDS, JUDGMENTS, GENERATIONS,
                                  HELDOUT_LOSSES, EVAL_RESULTS)}
