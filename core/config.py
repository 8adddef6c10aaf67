"""Run configuration: pydantic models (typed, so the Prefect UI renders a form), loaded from YAML.

`load_config(path, overrides)` applies `--set section.key=value` overrides and turns validation errors
into one line that names the file and the field.
"""
from __future__ import annotations

import numbers
import os
import re
import textwrap
import types
import typing
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema, create_model,
                      field_validator, model_validator)

from sftcurate.core.gate import GateConfig
from sftcurate.core.selectors import REGISTRY
from sftcurate.core.selectors.base import SelectorParams, selector_class, selector_help
from sftcurate.core.target import needs_target, reads_target
from sftcurate.core.training_text import check_template
from sftcurate.data_contracts.errors import UserError


def _int_shape(annotation) -> str | None:
    """"int" for a field holding one integer (optional or not), "list" for a list of integers, else None."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if annotation is int or (typing.get_origin(annotation) in (typing.Union, types.UnionType) and args == [int]):
        return "int"
    if typing.get_origin(annotation) is list and args == [int]:
        return "list"
    return None


def _whole(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)  # numpy integers count


class WholeNumbers(BaseModel):
    """Counts are integers: pydantic would read `true` as 1, 2.0 as 2 and "8" as 8 (`--set selection.budget=true`
    ran with budget 1), so a boolean, a float or a string is refused where an integer is expected."""

    @field_validator("*", mode="before")
    @classmethod
    def _strict_integers(cls, value, info):
        shape = _int_shape(cls.model_fields[info.field_name].annotation)
        values = value if shape == "list" and isinstance(value, list) else [value] if shape == "int" else []
        for v in values:
            if v is not None and not _whole(v):
                raise ValueError(f"expected a whole number, got {type(v).__name__} {v!r}")
        return value


class Section(WholeNumbers):
    model_config = ConfigDict(extra="forbid")


class SourceConfig(Section):
    uri: str = Field("builtin:python-docs", description="jsonl/json/parquet/csv/txt file or glob, s3:// URI, "
                     "hf:NAME Hugging Face dataset, or builtin:python-docs")
    format: Literal["auto", "text", "prompt_response", "alpaca", "messages", "sharegpt"] = Field(
        "auto", description="record format; auto detects it from the columns")
    columns: dict[str, str] = Field(default_factory=dict, description="canonical field -> column name, e.g. "
                                    "{prompt: question, response: answer}")
    hf_split: str = Field("train", description="split of a Hugging Face dataset")
    hf_config: str | None = Field(None, description="config name of a Hugging Face dataset")
    limit: int | None = Field(None, gt=0, description="keep only the first N records (after reading)")
    sample: int | None = Field(None, gt=0, description="keep a seeded random sample of N records (after limit), "
                               "in file order: a fair subset of a file sorted by category")
    sample_seed: int = Field(0, description="seed of source.sample")
    group_field: str | None = Field(None, description="record field that names each example's group (e.g. "
                                    "category) for per-group metrics; default: where the record came from")
    heldout_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="share of examples held out, by id hash")
    split_field: str | None = Field(None, description="record field that names each example's split (train or "
                                    "heldout): your own held-out set, instead of heldout_fraction or "
                                    "heldout_per_group")
    heldout_per_group: int | None = Field(None, gt=0, description="hold out this many examples of every group "
                                          "instead of a fraction (the lowest id hashes; at most half a group), so "
                                          "small groups get enough held-out examples for an interval")
    passage_chars: int = Field(800, gt=0, description="target passage length when splitting plain text")
    too_long: Literal["drop", "cut", "keep"] = Field(
        "cut", description="an example longer than models.max_length (with the template): cut it to fit (the "
        "export gives the cut record), drop it, or keep it whole (its budget counts every token, while features "
        "and the built-in fine-tune see the first max_length); counted either way (core/training_text.py)")


# The selectors and their parameters below come from the registry (`core.selectors`): a selector is declared in
# its own module only.
BUILTIN_METHODS = list(REGISTRY)


def _registered_method(name: str) -> str:
    selector_class(name)  # one line naming the known selectors when it is not one
    return name


def method_type(names: list[str]):
    """A selector name: a drop-down of `names` in the Prefect UI; any registered selector is accepted."""
    return Annotated[str, AfterValidator(_registered_method), WithJsonSchema({"type": "string", "enum": names})]


Method = method_type(BUILTIN_METHODS)


class ParamsSections(Section):
    @field_validator("*", mode="before")
    @classmethod
    def _strict_selector_integers(cls, value, info):
        """A selector's counts are whole numbers too (its params model lives with the selector)."""
        model = cls.model_fields[info.field_name].annotation
        if isinstance(value, dict) and isinstance(model, type) and issubclass(model, BaseModel):
            for key, v in value.items():
                declared = model.model_fields.get(key)
                if declared is not None and _int_shape(declared.annotation) and v is not None and not _whole(v):
                    raise ValueError(f"'{key}' expected a whole number, got {type(v).__name__} {v!r}")
        return value

    def of(self, method: str) -> SelectorParams:
        return getattr(self, method, None) or SelectorParams()


def selector_params_model(registry: dict) -> type[ParamsSections]:
    """Every selector's typed parameters, one section each (a selector without parameters has none)."""
    sections = {name: (cls.Params, Field(default_factory=cls.Params, description=selector_help(cls)))
                for name, cls in registry.items() if cls.Params.model_fields}
    return create_model("SelectorParamsConfig", __base__=ParamsSections, __doc__=selector_params_model.__doc__,
                        **sections)


SelectorParamsConfig = selector_params_model(REGISTRY)


def _nest_params_under_method(params, method: str):
    """`params: {lam: 2}` is shorthand for `params: {fishersft: {lam: 2}}` when the method is fishersft."""
    if not isinstance(params, dict):
        return params
    sections = set(SelectorParamsConfig.model_fields)
    loose = {k: v for k, v in params.items() if k not in sections}
    if not loose:
        return params
    nested = {k: v for k, v in params.items() if k in sections}
    nested[method] = {**(nested.get(method) or {}), **loose}
    return nested


DEFAULT_EXAMPLE_BUDGET = 64  # examples kept when a config sets neither budget nor token_budget


class SelectionConfig(Section):
    method: Method = Field("uniform", description="the selector")
    budget: int | None = Field(None, description=f"number of examples to keep ({DEFAULT_EXAMPLE_BUDGET} when "
                               "token_budget is unset too; with token_budget alone there is no example cap)")
    token_budget: int | None = Field(None, description="number of loss tokens to keep (cost-aware); with budget "
                                     "too, both are honoured and the run says which one stopped the selection")
    seed: int = Field(0, description="seed of every random choice")
    params: SelectorParamsConfig = Field(default_factory=SelectorParamsConfig,
                                         description="each selector's parameters (the chosen method's are used)")
    target: str | None = Field(None, description="a file of target records (any format source.uri reads) that "
                               "similarity and fishersft_target aim at, and s2l and fishersft when it is set; "
                               "embedded like the pool")
    gate: GateConfig | None = Field(None, description="a quality gate before the selector: drop the worst share of "
                                    "the pool by a score (any selector, uniform included)")

    @model_validator(mode="before")
    @classmethod
    def _shorthand_params(cls, data):
        if isinstance(data, dict) and "params" in data:
            data = {**data, "params": _nest_params_under_method(data["params"], data.get("method", "uniform"))}
        return data

    @property
    def selector_params(self) -> SelectorParams:
        return self.params.of(self.method)

    @property
    def examples_budget(self) -> int | None:
        """The example cap the run honours: `budget`; the default when no budget is set at all; none when only
        `token_budget` is (a token budget is never silently capped by a default example count)."""
        if self.budget is None and self.token_budget is None:
            return DEFAULT_EXAMPLE_BUDGET
        return self.budget

    @model_validator(mode="after")
    def _target_when_aimed(self):
        cls = selector_class(self.method)
        if needs_target(cls) and not self.target:
            raise ValueError(f"selection.target: selector '{self.method}' aims at a target; set selection.target "
                             "to a file of target records")
        if self.target and not reads_target(cls):  # a target nothing reads would look like one that was aimed at
            raise ValueError(f"selection.target: selector '{self.method}' does not aim at a target; choose one "
                             "that does (" + ", ".join(n for n, c in REGISTRY.items() if reads_target(c))
                             + ") or unset selection.target")
        return self

    @model_validator(mode="after")
    def _positive_budget(self):
        for name in ("budget", "token_budget"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        return self


class ModelsConfig(Section):
    target: str = Field("tiny-gpt2", description="model to curate for and fine-tune: tiny-gpt2, "
                        "builtin:smollm2-135m-instruct, a hub id, a local or s3:// folder")
    proxy: str = Field("tiny-gpt2", description="small proxy model for S2L loss trajectories")
    max_length: int = Field(256, gt=8, description="max tokens per example (prompt + response)")
    template: Annotated[str, AfterValidator(check_template)] = Field(
        "auto", description="the text every stage tokenizes: chat (the target's chat template, as TRL renders "
        "messages), plain (prompt, response, eos), a format string with {prompt} and {response}, or auto (chat "
        "when the target's tokenizer has a chat template, else plain)")


class EmbeddingConfig(Section):
    batch_tokens: int = Field(4096, gt=0, description="padded tokens per forward batch")
    shard_size: int = Field(2048, gt=0, description="examples per token-features shard")
    sentence_rank: int | None = Field(
        None, ge=1, description="store each sentence's rank-r factor (min(tokens, r) rows) instead of its tokens: "
        "FisherSFT's log det is exact when a sentence's rank is at most r, else loses the energy reported; off "
        "(tokens) by default")
    d_proj: int | None = Field(None, description="reduce features to this many dimensions")
    projection: Literal["random", "pca"] = Field("random", description="how to reduce d when d_proj is set")
    dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU")
    model: str = Field("target", description="the model whose token features FisherSFT reads: target (models."
                       "target), proxy (models.proxy, a smaller model; the target is then only fine-tuned) or "
                       "any model spec")


class ProxyConfig(Section):
    steps: int = Field(200, gt=0, description="proxy training steps over the whole pool")
    checkpoints: int = Field(10, gt=1, description="number of evenly spaced checkpoints (T)")
    learning_rate: float = Field(1e-3, gt=0)
    batch_size: int = Field(16, gt=0)
    lora: bool = Field(False, description="fine-tune a pretrained proxy through LoRA instead of fully")
    batch_tokens: int = Field(8192, gt=0, description="padded tokens per batch when logging trajectories")
    shard_size: int = Field(4096, gt=0, description="pool examples per trajectory shard (one task each)")
    seed: int = Field(0, description="seed of proxy training (data order, dropout)")


class PoolConfig(Section):
    """The sections every flow shares: where the pool comes from and the models that read it."""

    name: str = Field("curation", description="name of this run (MLflow run name)")
    source: SourceConfig = Field(default_factory=SourceConfig)
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    embedding: EmbeddingConfig = Field(default_factory=EmbeddingConfig)
    proxy: ProxyConfig = Field(default_factory=ProxyConfig)

    def pool_sections(self) -> dict:
        return {name: getattr(self, name) for name in ("source", "models", "embedding", "proxy")}


class CurateConfig(PoolConfig):
    name: str = Field("curation", description="name of this curation (MLflow run name)")
    selection: SelectionConfig = Field(default_factory=SelectionConfig)


# ---------------------------------------------------------------- the judge of a comparison

ENV_BASE_URL = "SFTCURATE_JUDGE_BASE_URL"
ENV_MODEL = "SFTCURATE_JUDGE_MODEL"
ENV_KEYS = ("SFTCURATE_JUDGE_API_KEY", "OPENAI_API_KEY")

DEFAULT_TEMPLATE = """You are an expert reviewer of {domain}. Two texts were written as a continuation of the \
same prompt.

Prompt:
{prompt}

Text 1:
{text_1}

Text 2:
{text_2}

Which text is the better continuation of the prompt for this domain: more fluent, coherent, accurate and on \
topic? Answer with a single character: 1 or 2."""



class JudgeConfig(WholeNumbers):
    """Judge and generation settings of a comparison. Secrets are never part of it (environment only)."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["hf", "openai"] = Field("hf", description="hf: a local model; openai: an OpenAI-compatible API")
    model: str | None = Field(None, description="hf: a model spec (default builtin:smollm2-135m-instruct); "
                              "openai: the model name (default $SFTCURATE_JUDGE_MODEL)")
    base_url: str | None = Field(None, description="openai: e.g. http://localhost:8000/v1 "
                                 "(default $SFTCURATE_JUDGE_BASE_URL)")
    template: str = Field(DEFAULT_TEMPLATE, description="judge prompt with {prompt}, {text_1}, {text_2}, {domain}")
    domain: str = Field("this kind of text", description="fills {domain} in the template")
    max_prompts: int = Field(32, gt=0, description="held-out prompts to generate for and judge")
    max_new_tokens: int = Field(48, gt=0, description="tokens each model generates per prompt")
    prompt_words: int = Field(12, gt=0, description="plain text: words of a held-out passage shown as the prompt")
    max_chars: int = Field(2000, gt=0, description="each text is cut to this many characters in the judge prompt")
    concurrency: int = Field(4, gt=0, description="openai: requests in flight")
    timeout_s: float = Field(60.0, gt=0)
    max_retries: int = Field(5, ge=0)
    backoff_s: float = Field(1.0, ge=0, description="first retry delay; doubles each retry")
    check: str = Field("normalized", description="the generation metric: how a generated answer is checked "
                       "against the held-out reference: normalized (case, punctuation and articles ignored), "
                       "exact, or module:function (your function of (generation, reference) -> bool)")
    logprobs: bool = Field(True, description="openai: ask for the answer token's logprobs to record P(slot 1); "
                           "switched off automatically if the endpoint refuses them")
    n_bootstrap: int = Field(1000, gt=0)

    @field_validator("check")
    @classmethod
    def _check_form(cls, v: str) -> str:
        if v not in ("normalized", "exact") and not re.fullmatch(r"[\w.]+:\w+", v):
            raise ValueError(f"'{v}' is neither normalized, exact nor module:function")
        return v

    @field_validator("template")
    @classmethod
    def _has_slots(cls, v: str) -> str:
        missing = [s for s in ("{text_1}", "{text_2}") if s not in v]
        if missing:
            raise ValueError(f"judge template must contain {', '.join(missing)}")
        try:
            v.format(prompt="", text_1="", text_2="", domain="")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"judge template has an unknown placeholder or stray brace: {exc}") from None
        return v

    def identity(self) -> dict:
        """What makes two judgments comparable (cache key); no secret is part of it."""
        d = self.model_dump(exclude={"concurrency", "timeout_s", "max_retries", "backoff_s", "check"})
        if self.backend != "openai":
            d.pop("logprobs")
        else:
            d["model"] = self.model or os.environ.get(ENV_MODEL)
            d["base_url"] = self.base_url or os.environ.get(ENV_BASE_URL)
        return d



# ---------------------------------------------------------------- a comparison

class GenerationConfig(WholeNumbers):
    """How held-out prompts are drawn and completed; identical for every model of a comparison."""

    model_config = ConfigDict(extra="forbid")

    max_prompts: int = Field(32, gt=0, description="held-out prompts to generate for (and judge)")
    max_new_tokens: int = Field(48, gt=0)
    prompt_words: int = Field(12, gt=0, description="plain text: words of the passage shown as the prompt")
    batch_size: int = Field(8, gt=0)
    max_length: int = Field(256, gt=8, description="prompt tokens kept (from the end) + new tokens")
    decoding: Literal["greedy", "sample"] = Field("greedy")
    temperature: float = Field(0.7, gt=0, description="only for decoding: sample")
    seed: int = Field(0)


class FinetuneConfig(WholeNumbers):
    """The one training recipe every selection of a budget shares."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(100, gt=0, description="optimizer steps (fixed, not epochs: every selection gets the same)")
    learning_rate: float = Field(5e-4, gt=0)
    batch_size: int = Field(8, gt=0, description="examples per step")
    max_length: int = Field(256, gt=8, description="max tokens per example (prompt + response)")
    seed: int = Field(0, description="seeds the adapter init, the batch order and dropout")
    full: bool = Field(False, description="full fine-tuning instead of LoRA")
    lora_r: int = Field(8, gt=0)
    lora_alpha: int = Field(16, gt=0)
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | None = Field(None, description="LoRA modules; default chosen per architecture")
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, gt=0)
    batching: Literal["length_grouped", "random", "pad_to_max"] = Field(
        "length_grouped", description="length_grouped: similar lengths share a batch (little padding); "
        "random: pad to the batch's longest; pad_to_max: pad every batch to max_length (baseline)")
    checkpoint_every: int = Field(50, gt=0, description="commit a resumable checkpoint every N steps")
    dtype: Literal["float32", "bfloat16"] = Field("float32")
    train_tokens: int | None = Field(None, gt=0, description="loss tokens to train on: the steps are derived "
                                     "from it (overriding steps), so every selection gets the same token compute")


BASELINE = "uniform"


class CompareConfig(PoolConfig):
    name: str = Field("comparison", description="name of this comparison (MLflow parent run name)")
    methods: list[Method] = Field(default_factory=lambda: ["uniform", "fishersft"],
                                  description="selectors to compare; uniform (the baseline) is always added")
    params: SelectorParamsConfig = Field(default_factory=SelectorParamsConfig,
                                         description="each selector's parameters")
    budgets: list[int] = Field(default_factory=lambda: [8192, 16384], description="budgets to compare at")
    budget_unit: Literal["tokens", "examples"] = Field(
        "tokens", description="what a budget counts: loss tokens (what a user pays for) or examples")
    epochs: float = Field(2.0, gt=0, description="token compute of every cell at a budget: epochs x the budget's "
                          "loss tokens (for example budgets, x the uniform selection's loss tokens); every "
                          "method, and the full-pool reference, trains on exactly that many tokens")
    replicates: int = Field(1, ge=1, description="repeat every cell with other seeds (selection and fine-tuning); "
                            "intervals cover the replicates")
    reference_full: bool = Field(True, description="also train on the whole pool with the same token compute")
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig,
                                     description="one recipe for every cell (max_length defaults to models'); "
                                     "its steps are derived from the token compute")
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    target: str | None = Field(None, description="a file of target records for the methods that aim at one "
                               "(selection.target of each of their cells)")
    gate: GateConfig | None = Field(None, description="a quality gate in front of every method, uniform "
                                    "included (selection.gate of every cell)")
    seed: int = Field(0, description="seed of selection, prompt sampling and bootstrap")

    @model_validator(mode="after")
    def _check(self):
        if not self.budgets or any(b <= 0 for b in self.budgets):
            raise ValueError("budgets must be a non-empty list of positive numbers")
        if len(set(self.budgets)) != len(self.budgets):
            raise ValueError("budgets must not repeat")
        if not self.methods:
            raise ValueError("methods must name at least one selector")
        if "max_length" not in self.finetune.model_fields_set:
            self.finetune = self.finetune.model_copy(update={"max_length": self.models.max_length})
        return self

    @property
    def all_methods(self) -> list[str]:
        return [BASELINE] + [m for m in dict.fromkeys(self.methods) if m != BASELINE]

    def curate_config(self, method: str, budget: int, replicate: int = 0, unit: str | None = None) -> CurateConfig:
        """The curation of one cell; replicate r draws with seed + r."""
        examples, tokens = (budget, None) if (unit or self.budget_unit) == "examples" else (None, budget)
        return CurateConfig(
            name=f"{self.name}:{method}@{budget}", **self.pool_sections(),
            selection=SelectionConfig(method=method, budget=examples, token_budget=tokens,
                                      seed=self.seed + replicate, params=self.params, target=self.aimed(method),
                                      gate=self.gate))

    def aimed(self, method: str) -> str | None:
        """The target file a method's cells aim at: only the methods that need one (uniform keeps its key, and
        s2l and fishersft stay the untargeted methods a comparison holds the aimed ones against)."""
        return self.target if needs_target(selector_class(method)) else None

    def finetune_config(self, train_tokens: int, replicate: int = 0) -> FinetuneConfig:
        """The one recipe, at the budget's token compute; replicate r trains with seed + r."""
        return self.finetune.model_copy(update={"train_tokens": int(train_tokens),
                                                "seed": self.finetune.seed + replicate})

    def generation_config(self) -> GenerationConfig:
        return GenerationConfig(max_prompts=self.judge.max_prompts, max_new_tokens=self.judge.max_new_tokens,
                                prompt_words=self.judge.prompt_words, max_length=self.models.max_length,
                                seed=self.seed)


class ConfigError(UserError):
    pass


def _parse_value(text: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item}: expected key=value, e.g. --set selection.budget=100")
        key, value = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item}: '{part}' is not a section")
        node[parts[-1]] = _parse_value(value)
    return data


def _section_fields(model: type[BaseModel], loc: tuple) -> list[str] | None:
    """The field names of the section at `loc` inside `model` (None when `loc` leaves the typed sections)."""
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return list(model.model_fields)


def format_validation_error(exc: ValidationError, where: str, model: type[BaseModel] | None = None) -> str:
    err = exc.errors()[0]
    field = ".".join(str(p) for p in err["loc"])
    more = f" (+{len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    if err["type"] == "extra_forbidden" and model is not None:
        valid = _section_fields(model, err["loc"][:-1])
        if valid is not None:
            return f"{where}: field '{field}' is unknown; valid keys there: {', '.join(valid)}{more}"
    return f"{where}: field '{field}': {err['msg'].removeprefix('Value error, ')}{more}"


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, model=CurateConfig):
    data: dict = {}
    where = str(path) if path else "<defaults>"
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"{p}: config file not found")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{p}: not valid YAML ({str(exc).splitlines()[0]})") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: top level must be a mapping of sections")
    data = apply_overrides(data, overrides or [])
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, where, model)) from exc


def load_compare_config(path: str | Path | None = None, overrides: list[str] | None = None) -> CompareConfig:
    return load_config(path, overrides, model=CompareConfig)


def dump_config(cfg: BaseModel, described: bool = False) -> str:
    """The configuration as YAML, every field included (what `sftcurate config show` prints); `described`: each
    field under a comment with its description (what `sftcurate config init` writes, to edit)."""
    if not described:
        return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
    return "".join(_described_lines(cfg, ""))


def _described_lines(model: BaseModel, indent: str):
    values = model.model_dump(mode="json")
    for name, field in type(model).model_fields.items():
        if field.description:
            yield from (f"{indent}# {line}\n" for line in textwrap.wrap(field.description, 116 - len(indent)))
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            yield f"{indent}{name}:\n"
            yield from _described_lines(value, indent + "  ")
        else:
            text = yaml.safe_dump({name: values[name]}, sort_keys=False, allow_unicode=True, width=10**6)
            yield "".join(f"{indent}{line}\n" for line in text.splitlines())
