"""Run configuration: pydantic models (typed, so the Prefect UI renders a form), loaded from YAML.

`load_config(path, overrides)` applies `--set section.key=value` overrides and turns validation errors
into one line that names the file and the field.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from data_contracts.errors import UserError


class Section(BaseModel):
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
    limit: int | None = Field(None, description="keep only the first N records (after reading)")
    heldout_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="share of examples held out, by id hash")
    passage_chars: int = Field(800, gt=0, description="target passage length when splitting plain text")


class SelectionConfig(Section):
    method: str = Field("uniform", description="selector name: uniform, fishersft, s2l, density, askllm")
    budget: int | None = Field(64, description="number of examples to keep")
    token_budget: int | None = Field(None, description="number of loss tokens to keep (cost-aware)")
    seed: int = Field(0, description="seed of every random choice")
    params: dict[str, Any] = Field(default_factory=dict, description="selector-specific parameters")

    @model_validator(mode="after")
    def _positive_budget(self):
        if self.budget is None and self.token_budget is None:
            raise ValueError("set budget (examples) or token_budget (tokens)")
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


class EmbeddingConfig(Section):
    batch_tokens: int = Field(4096, gt=0, description="padded tokens per forward batch")
    shard_size: int = Field(2048, gt=0, description="examples per token-features shard")
    d_proj: int | None = Field(None, description="reduce features to this many dimensions")
    projection: Literal["random", "pca"] = Field("random", description="how to reduce d when d_proj is set")
    dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU")


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


def format_validation_error(exc: ValidationError, where: str) -> str:
    err = exc.errors()[0]
    field = ".".join(str(p) for p in err["loc"])
    more = f" (+{len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"{where}: field '{field}': {err['msg']}{more}"


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
        raise ConfigError(format_validation_error(exc, where)) from exc
