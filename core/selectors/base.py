"""One interface for every selector (scikit-learn style): inputs, budget and seed in; a selection out.

A selector is one module: a `Selector` subclass with its `name`, its typed `Params`, what it `requires` and
`select`, decorated with `@register`. The `curate` flow produces exactly what it requires and hands it over in
`SelectorInputs`. Methods are looked up by name in `REGISTRY`, so the flow, the CLI and the compare loop treat
them alike, and the config's method drop-down, its params sections and the CLI's `select` subcommands are
derived from it.

What a selector requires beyond the pool is a `Requirement`, declared once with `declare`: how a selection
reads it (`load`), how `sftcurate select` reads it from a file (`from_file`), and how the curate flow makes it
(`produce`: library calls that `tasks.curate` runs as Prefect tasks). The built-in ones are in
`core.requirements`; a new one may sit in the module of the selector that needs it.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, ValidationError

from sftcurate.data_contracts import ContractError
from sftcurate.data_contracts.errors import UserError

# What a selector may require. The flow knows how to make each one.
EXAMPLES = "examples"              # always available: the pool table (train split)
TOKEN_FEATURES = "token_features"  # FisherSFT: pre-logit hidden states per loss token
TRAJECTORIES = "trajectories"      # S2L: per-example loss at each proxy checkpoint
SENTENCE_EMBEDDINGS = "sentence_embeddings"  # DensitySampling: one vector per example
MODEL = "model"                    # Ask-LLM: a model spec to score with

DEVICE_HELP = "auto (SFTCURATE_DEVICE, else cuda when available, else cpu), cpu, cuda"


class BudgetError(UserError):
    pass


class SelectorParamError(UserError):
    """An unknown selector, or a selector parameter that is unknown or of the wrong type."""


class SelectorParams(BaseModel):
    """A selector's parameters: typed, with defaults and descriptions (the Prefect UI renders them as a form);
    an unknown key is refused."""

    model_config = ConfigDict(extra="forbid")


def parse_params(method: str, params_model: type[SelectorParams], values, where: str = "params"):
    """`values` (a dict or a params model) as `params_model`, or one line naming the bad key and the valid ones."""
    if isinstance(values, params_model):
        return values
    if isinstance(values, BaseModel):
        values = values.model_dump(exclude_unset=True)
    try:
        return params_model.model_validate(values or {})
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        valid = ", ".join(params_model.model_fields) or "none"
        if err["type"] == "extra_forbidden":
            raise SelectorParamError(f"{where}.{key}: '{method}' has no parameter '{key}'; valid: {valid}") from None
        raise SelectorParamError(f"{where}.{key}: {err['msg']} (got {err.get('input')!r})") from None


@dataclass(frozen=True)
class Budget:
    """A number of examples, or a number of loss tokens (what a user pays for); at least one is set."""

    examples: int | None = None
    tokens: int | None = None

    def check(self, pool_size: int, pool_tokens: int | None = None) -> None:
        if self.examples is None and self.tokens is None:
            raise BudgetError("budget: set 'budget' (examples) or 'token_budget' (tokens)")
        if self.examples is not None:
            if self.examples <= 0:
                raise BudgetError(f"budget: must be > 0 examples, got {self.examples}")
            if self.examples > pool_size:
                raise BudgetError(
                    f"budget: {self.examples} examples is larger than the pool ({pool_size} train examples); "
                    "lower the budget or add data")
        if self.tokens is not None:
            if self.tokens <= 0:
                raise BudgetError(f"token_budget: must be > 0 tokens, got {self.tokens}")
            if pool_tokens is not None and self.tokens > pool_tokens:
                raise BudgetError(
                    f"token_budget: {self.tokens} tokens is larger than the pool ({pool_tokens} loss tokens); "
                    "lower the budget or add data")

    def fits(self, n_picked: int, tokens_picked: int, next_tokens: int) -> bool:
        """Whether one more example of `next_tokens` tokens still fits."""
        if self.examples is not None and n_picked + 1 > self.examples:
            return False
        if self.tokens is not None and tokens_picked + next_tokens > self.tokens:
            return False
        return True


@dataclass
class SelectorInputs:
    """Everything a selector may read. Arrays are aligned with the pool order (row i = pool index i)."""

    pool: pa.Table                               # examples contract, train split only, pool order
    token_counts: np.ndarray                     # loss tokens per example (int64, [N])
    token_features: tuple[np.ndarray, np.ndarray] | None = None  # (features [T, d], offsets [N+1])
    trajectories: tuple[np.ndarray, np.ndarray] | None = None    # (losses [N, T], steps [T])
    sentence_embeddings: np.ndarray | None = None                # [N, d]
    model_spec: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)          # what other requirements load, by name

    @property
    def size(self) -> int:
        return self.pool.num_rows


@dataclass
class SelectionResult:
    indices: list[int]                                    # pool positions, in pick order
    gains: list[float] | None = None                      # marginal objective gain per pick
    scores: list[float] | None = None                     # per-pick method score
    clusters: list[int] | None = None                     # per-pick cluster
    objective: float | None = None                        # final objective value, where the method has one
    info: dict = field(default_factory=dict)              # JSON-able method summary (goes to the manifest)


class Selector:
    """Base class. Subclasses set `name`, `requires`, `Params` (their typed parameters), and implement `select`;
    the first line of the subclass's docstring is its one-line help (`sftcurate select --help`)."""

    name: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = (EXAMPLES,)
    Params: ClassVar[type[SelectorParams]] = SelectorParams

    def __init__(self, params: SelectorParams | dict | None = None):
        self.params = parse_params(self.name, self.Params, params)

    @classmethod
    def requirements(cls, target: bool = False) -> tuple[str, ...]:
        """What a run of this selector reads, in the order it is made: `requires`, and with a target set
        (`selection.target`, `--target-features`) what the selector reads of it too. A selector that can aim at
        a target without needing one (S2L, FisherSFT) overrides this; one that needs a target lists it in
        `requires`."""
        return cls.requires

    def select(self, inputs: SelectorInputs, budget: Budget, seed: int) -> SelectionResult:
        raise NotImplementedError


REGISTRY: dict[str, type[Selector]] = {}


def register(cls: type[Selector]) -> type[Selector]:
    REGISTRY[cls.name] = cls
    return cls


def selector_class(name: str) -> type[Selector]:
    # complete here: importing this module ran the package's __init__, which imports every built-in selector
    if name not in REGISTRY:
        close = difflib.get_close_matches(name, sorted(REGISTRY), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise SelectorParamError(f"selector '{name}' is unknown; {hint}choose one of {sorted(REGISTRY)}")
    return REGISTRY[name]


def get_selector(name: str, params: SelectorParams | dict | None = None) -> Selector:
    return selector_class(name)(params)


def selector_help(cls: type[Selector]) -> str:
    """A selector's one line of help: the first line of its class docstring."""
    return (cls.__doc__ or cls.name).strip().splitlines()[0]


# ---------------------------------------------------------------- requirements: declared once each

@dataclass(frozen=True)
class Step:
    """One library call of a production, run as one Prefect task named `task` (what the UI and the terminal
    show); it returns an artifact URI (`infra.stages.Built`). With `when`, it runs only where `when(cfg)`
    holds (a prepare step that the config may switch off), and what it would have made is None."""

    task: str
    run: Callable[..., str]
    when: Callable[[Any], bool] | None = None


@dataclass(frozen=True)
class Summary:
    """A markdown summary of a produced artifact for the Prefect UI (`key` names the UI artifact)."""

    key: str
    description: str
    markdown: Callable[[str], str]


@dataclass(frozen=True)
class Production:
    """How the curate flow makes a requirement from the pool, as library calls. `tasks.curate.produce` runs
    them as Prefect tasks: `prepare(examples_uri, cfg, run_id)` once (what the shards share: an artifact URI or
    None), then `shard(examples_uri, cfg, prepared, index)` for each of `shards(examples_uri, cfg)` shards,
    mapped over the flow's task runner, then `commit(examples_uri, cfg, prepared, shard_uris, run_id)`, whose
    artifact is the requirement's. `cfg` is the run's `CurateConfig`; `run_id` its MLflow run (or None)."""

    shards: Callable[[str, Any], int]
    shard: Step
    commit: Step
    prepare: Step | None = None
    summary: Summary | None = None


@dataclass(frozen=True)
class FileInput:
    """How `sftcurate select` takes a requirement from the command line: `--<option> VALUE`, then
    `read(value, inputs)` fills `inputs` and returns (the pool's ids, its token counts), each None when the
    file does not say. With `needs_examples`, the pool must come from `--examples` too."""

    option: str
    help: str
    read: Callable[[str, SelectorInputs], tuple[list[str] | None, np.ndarray | None]]
    needs_examples: bool = False


@dataclass(frozen=True)
class Requirement:
    """What a selector needs beyond the pool, in one declaration: its name (what selectors list in
    `requires`), `load(artifact_uri, inputs)` filling `SelectorInputs` from the committed artifact (checked
    against the pool), `produce` (how the curate flow makes that artifact) and `from_file` (how `sftcurate
    select` reads it). A requirement without `load` is not an artifact (the target model: a spec)."""

    name: str
    load: Callable[[str, SelectorInputs], None] | None = None
    produce: Production | None = None
    from_file: FileInput | None = None


REQUIREMENTS: dict[str, Requirement] = {}


def declare(requirement: Requirement) -> Requirement:
    """Register a requirement under its name (one declaration per name)."""
    known = REQUIREMENTS.get(requirement.name)
    if known is not None and known != requirement:
        raise ValueError(f"requirement '{requirement.name}' is declared twice")
    REQUIREMENTS[requirement.name] = requirement
    return requirement


def check_pool_alignment(uri: str, ids: list[str] | None, pool: pa.Table, what: str) -> None:
    """An upstream artifact's rows must be the pool's examples in pool order; say which row is not."""
    pool_ids = pool.column("id").to_pylist()
    if ids is None or len(ids) != len(pool_ids):
        raise ContractError(f"{uri}: {what} cover {0 if ids is None else len(ids)} examples but the pool has "
                            f"{len(pool_ids)}; re-run the stage that makes them for this pool")
    if ids != pool_ids:
        row = next(i for i, (a, b) in enumerate(zip(ids, pool_ids)) if a != b)
        raise ContractError(f"{uri}: row {row} is example '{ids[row]}' but pool index {row} is '{pool_ids[row]}'; "
                            f"the {what} were computed for a different pool; re-run that stage")


def fill_in_order(order: np.ndarray, token_counts: np.ndarray, budget: Budget) -> list[int]:
    """Take candidates in `order` while they fit the budget (skipping ones too long for a token budget)."""
    picked: list[int] = []
    used = 0
    for i in order:
        i = int(i)
        n = int(token_counts[i])
        if budget.examples is not None and len(picked) >= budget.examples:
            break
        if budget.tokens is not None and used + n > budget.tokens:
            continue
        picked.append(i)
        used += n
    return picked


def pool_token_features(inputs: "SelectorInputs", who: str) -> tuple:
    """(features, offsets int64) of the pool's token features, checked to cover the pool (one line otherwise)."""
    if inputs.token_features is None:
        raise ValueError(f"{who}: no token features were loaded (requirement 'token_features')")
    features, offsets = inputs.token_features
    offsets = np.asarray(offsets, dtype=np.int64)
    if len(offsets) - 1 != inputs.size:
        raise ValueError(f"{who}: token features cover {len(offsets) - 1} examples but the pool has {inputs.size}; "
                         "re-run the embedding stage for this pool")
    return features, offsets
