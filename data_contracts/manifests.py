"""Typed manifest `meta`: one pydantic model per artifact kind that has one, validated when the artifact is
committed (`infra.stages.build_once(..., meta=Model)`) and when it is read (`infra.stages.read_meta`), so a
renamed or missing key fails at the writer, in one line, and readers get attributes instead of string keys.

Field types are the ones the writers produce (a float stays a float, an int an int), so validating a meta
before it is written leaves the manifest's bytes as they were. A field with a default is one an older writer
of the same kind may leave out (the gate's fields of a gated examples artifact); it is written only when set.
"""
from __future__ import annotations

from typing import ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from sftcurate.data_contracts.schemas import ContractError


class ManifestMeta(BaseModel):
    """A kind's manifest meta: every key declared, no other key accepted."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: ClassVar[str]                # the artifact kind this meta belongs to (`build_once(kind, ...)`)


class ExamplesMeta(ManifestMeta):
    """The examples artifact (`core.ingest.ingest`), and the gated pool (`core.gate_scores.gated_examples`:
    the same meta with the gate's three fields)."""

    kind: ClassVar[str] = "examples"
    fingerprint: str
    source: str
    source_fingerprint: str
    records: int
    duplicates_removed: int
    formats: dict[str, int]            # record format -> records read in it
    n_examples: int
    n_train: int
    n_heldout: int
    train_tokens: int                  # loss tokens of the train split
    tokenizer: str
    max_length: int
    columns: dict[str, str]            # canonical field -> the source's column
    template: str                      # `core.training_text.Fitted.meta`: the template and what too_long did
    too_long: str
    too_long_dropped: int
    too_long_cut: int
    too_long_whole: int
    skipped_files: dict[str, str]      # a folder source's unread files -> why
    gate_uri: str | None = None        # set on a gated pool only
    gated_from: str | None = None
    gate_dropped: int | None = None


class GateMeta(ManifestMeta):
    """The quality gate's scores (`core.gate_scores.commit_gate`)."""

    kind: ClassVar[str] = "gate"
    score: str
    drop: float
    pool_size: int
    dropped: int
    kept: int
    examples_key: str                  # the pool these scores were computed for
    threshold: float | None            # the highest kept score
    score_quantiles: dict[str, float]  # "0.1", "0.5", "0.9" -> score


class SelectionMeta(ManifestMeta):
    """A selection's manifest (`core.selection.run_selection`)."""

    kind: ClassVar[str] = "selection"
    method: str
    budget: int | None                 # examples
    token_budget: int | None           # loss tokens
    seed: int
    params: dict                       # the selector's typed params, as JSON
    inputs: dict[str, str]             # requirement -> the committed artifact it was read from
    model: str | None                  # the model of a selector that scores with one
    examples_uri: str
    pool_size: int
    pool_tokens: int
    selected: int
    selected_tokens: int
    objective: float | None
    info: dict                         # the selector's own summary


class CuratedMeta(ManifestMeta):
    """A selection's records in the user's format (`core.export.commit_curated`)."""

    kind: ClassVar[str] = "curated"
    records: int
    selection_uri: str
    examples_uri: str


class ProjectionMeta(ManifestMeta):
    """The token features' projection matrix (`core.embedding`)."""

    kind: ClassVar[str] = "feature_projection"
    method: str
    d: int
    d_proj: int
    model: str


class FeatureShardMeta(ManifestMeta):
    """One shard of the pool's token features (`core.embedding.embed_shard`)."""

    kind: ClassVar[str] = "token_features_shard"
    shard_index: int
    shard_size: int
    rows: int
    tokens: int
    d: int
    model: str
    projection_uri: str | None
    sentence_rank: int | None = None   # set when the shard stores rank-r sentence factors, not tokens
    feature_rows: int | None = None    # (`core.fisher_features.stored_factors`)
    kept_energy_min: float | None = None
    kept_energy_sum: float | None = None


class TokenFeaturesMeta(ManifestMeta):
    """The token features: references to their shards (`core.embedding.commit_features`)."""

    kind: ClassVar[str] = "token_features"
    examples_uri: str
    n_examples: int
    shards: int
    layout: str
    tokens: int
    d: int | None                      # None: no shard
    model: str | None
    projection_uri: str | None
    sentence_rank: int | None = None   # set when the shards store sentence factors
    feature_rows: int | None = None    # (`core.fisher_features.factor_summary`)
    kept_energy_min: float | None = None
    kept_energy_mean: float | None = None


class ProxyCheckpoint(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    step: int
    uri: str


class ProxyMeta(ManifestMeta):
    """The S2L proxy and its checkpoints (`core.proxy.train_proxy`)."""

    kind: ClassVar[str] = "proxy"
    spec: str
    lora: bool
    params: dict                       # the training fields of the ProxyConfig
    max_length: int
    examples_uri: str
    n_examples: int
    steps: list[int]
    checkpoints: list[ProxyCheckpoint]
    tokenizer_uri: str
    resumed_from_step: int
    trained_steps: int
    final_loss: float | None           # None: nothing trained in this attempt


class TrajectoryShardMeta(ManifestMeta):
    """One shard's losses at every proxy checkpoint (`core.trajectories.trajectory_shard`)."""

    kind: ClassVar[str] = "trajectory_shard"
    shard_index: int
    shard_size: int
    rows: int
    proxy_uri: str


class TrajectoriesMeta(ManifestMeta):
    """The pool's loss trajectories (`core.trajectories.commit_trajectories`)."""

    kind: ClassVar[str] = "trajectories"
    proxy_uri: str
    examples_uri: str
    n_examples: int
    steps: list[int]
    mean_loss: list[float]             # per checkpoint
    std_loss: list[float]
    summary_png: str | None
    shards: list[str]


class FinetunedMeta(ManifestMeta):
    """A committed fine-tune (`core.finetune.finetune`)."""

    kind: ClassVar[str] = "finetuned"
    target_spec: str
    target_fingerprint: str
    mode: str                          # "lora" or "full"
    config: dict                       # the FinetuneConfig
    examples_uri: str
    selection_uri: str
    train_examples: int
    steps_done: int
    train_tokens: int | None
    tokens_seen: int
    final_loss: float | None
    resumed_from: int | None
    seconds: float
    tokens_per_s: float
    padding_fraction: float
    trainable_parameters: int
    torch: str


class HeldoutEvalMeta(ManifestMeta):
    """A model's held-out loss (`core.evaluate.evaluate_heldout`; `model_uri` None: the base model)."""

    kind: ClassVar[str] = "heldout_eval"
    loss: float
    ppl: float
    tokens: int
    examples: int
    model_uri: str | None
    target_spec: str
    examples_uri: str
    max_length: int


class GenerationsMeta(ManifestMeta):
    """A model's generations for the held-out prompts (`core.evaluate.generate`)."""

    kind: ClassVar[str] = "generations"
    model_uri: str | None
    target_spec: str
    examples_uri: str
    config: dict                       # the GenerationConfig
    n: int
    empty: int
    mean_chars: float


class JudgmentsMeta(ManifestMeta):
    """A pairwise judge's verdicts on two models' generations (`core.judge.run_judge`)."""

    kind: ClassVar[str] = "judgments"
    summary: dict                      # `core.judge.summarize`: win rate, interval, counts, biases
    method_a: str
    method_b: str
    generations_a: str
    generations_b: str
    judge: dict                        # `JudgeConfig.identity()`
    backend: str
    note: str | None
    requests: int | None
    retries: int | None


class JudgeSanityMeta(ManifestMeta):
    """The judge on pairs whose better side is known (`core.judge.judge_sanity`)."""

    kind: ClassVar[str] = "judge_sanity"
    accuracy: float | None             # None: no valid pair
    pairs: int
    errors: int
    position_bias: float | None
    trusted: bool
    threshold: float
    judge: dict
    summary: dict


class CompareReportMeta(ManifestMeta):
    """A comparison's report (`core.report.commit_report`)."""

    kind: ClassVar[str] = "compare_report"
    name: str
    methods: list[str]
    budgets: list[int]


def meta_problem(model: type[ManifestMeta], exc: ValidationError) -> str:
    """What is wrong with a meta, in one line: each field and what is wrong with it (a renamed key is both a
    missing and an unknown field), then the model."""
    fields = "; ".join(f"field '{'.'.join(str(p) for p in err['loc'])}': {err['msg']}" for err in exc.errors())
    return f"manifest meta {fields} ({model.__name__})"


def meta_to_write(model: type[ManifestMeta], kind: str, meta: dict) -> dict:
    """The meta a stage is about to commit, as `model` says (only the fields it set). A meta that does not fit
    is a bug in the stage, not the user's: a `ValueError` with one line naming the field (and a traceback)."""
    if model.kind != kind:
        raise ValueError(f"a {kind} artifact committed with {model.__name__}, the meta of {model.kind}")
    try:
        return model.model_validate(meta).model_dump(exclude_unset=True)
    except ValidationError as exc:
        raise ValueError(f"{kind}: {meta_problem(model, exc)}") from None


M = TypeVar("M", bound=ManifestMeta)


def check_meta(model: type[M], manifest: dict, where: str) -> M:
    """A committed manifest's meta as `model`, or one line naming the artifact, the field and what to do."""
    if manifest.get("kind") != model.kind:
        raise ContractError(f"{where}: a {manifest.get('kind')} artifact where a {model.kind} artifact was expected")
    try:
        return model.model_validate(manifest["meta"])
    except ValidationError as exc:
        raise ContractError(f"{where}: {meta_problem(model, exc)}; an artifact committed by another version: "
                            "rebuild it by running the command that made it") from None
