"""Typed manifest `meta`: one pydantic model per artifact kind that has one, validated when the artifact is
committed (`infra.stages.build_once(..., meta=Model)`) and when it is read (`infra.stages.read_meta`), so a
renamed or missing key fails at the writer, in one line, and readers get attributes instead of string keys.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, ValidationError

from sftcurate.data_contracts.schemas import ContractError


class ManifestMeta(BaseModel):
    """A kind's manifest meta: every key declared, no other key accepted."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class SelectionMeta(ManifestMeta):
    """A selection's manifest (`core.selection.run_selection`)."""

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


def check_meta(model: type[ManifestMeta], meta: dict, where: str) -> ManifestMeta:
    """`meta` as `model`, or one line naming the artifact, the field and what is wrong."""
    try:
        return model.model_validate(meta)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        raise ContractError(f"{where}: manifest meta field '{field}': {err['msg']} ({model.__name__}); an artifact "
                            "committed by another version: rebuild it by running the command that made it")
