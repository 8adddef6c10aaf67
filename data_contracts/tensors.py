"""Contracts for tensor artifacts stored as safetensors (token features, loss trajectories)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sftcurate.data_contracts.schemas import ContractError


@dataclass(frozen=True)
class TensorContract:
    name: str
    version: int
    tensors: dict[str, tuple[str, int]]   # tensor name -> (dtype kind: "float" | "int64", ndim)
    ids_sidecar: str                      # contract name of the parquet file holding the example ids

    def metadata(self) -> dict[str, str]:
        return {"sftcurate.contract": self.name, "sftcurate.version": str(self.version)}


TOKEN_FEATURES = TensorContract(
    name="token_features",
    version=1,
    tensors={"features": ("float", 2), "offsets": ("int64", 1)},
    ids_sidecar="token_features_ids",
)

TRAJECTORIES = TensorContract(
    name="trajectories",
    version=1,
    tensors={"losses": ("float", 2), "steps": ("int64", 1)},
    ids_sidecar="trajectories_ids",
)


def _check_kind(name: str, arr: np.ndarray, kind: str, ndim: int, where: str) -> None:
    if arr.ndim != ndim:
        raise ContractError(f"{where}: tensor '{name}' has shape {tuple(arr.shape)}, expected {ndim} dimensions")
    if kind == "float" and not np.issubdtype(arr.dtype, np.floating):
        raise ContractError(f"{where}: tensor '{name}' has dtype {arr.dtype}, expected a float type")
    if kind == "int64" and arr.dtype != np.int64:
        raise ContractError(f"{where}: tensor '{name}' has dtype {arr.dtype}, expected int64")


def validate_tensors(tensors: dict[str, np.ndarray], contract: TensorContract, where: str = "<memory>",
                     metadata: dict[str, str] | None = None) -> None:
    """Structural and numeric checks; raises ContractError naming the file, tensor and row."""
    if metadata:
        name = metadata.get("sftcurate.contract")
        if name is not None and name != contract.name:
            raise ContractError(f"{where}: is a '{name}' artifact, expected '{contract.name}'")
        version = metadata.get("sftcurate.version")
        if version is not None and int(version) != contract.version:
            raise ContractError(f"{where}: '{contract.name}' version {version}, this sftcurate reads {contract.version}")
    for name, (kind, ndim) in contract.tensors.items():
        if name not in tensors:
            raise ContractError(f"{where}: missing tensor '{name}' (has {sorted(tensors)})")
        _check_kind(name, tensors[name], kind, ndim, where)
    if contract is TOKEN_FEATURES:
        feats, offsets = tensors["features"], tensors["offsets"]
        if offsets.size < 1 or offsets[0] != 0:
            raise ContractError(f"{where}: 'offsets' must start at 0")
        steps = np.diff(offsets)
        if (steps < 0).any():
            bad = int(np.argmax(steps < 0))
            raise ContractError(f"{where}: 'offsets' not monotone at sentence {bad} ({offsets[bad]} > {offsets[bad + 1]})")
        if offsets[-1] != feats.shape[0]:
            raise ContractError(f"{where}: 'offsets' ends at {offsets[-1]} but 'features' has {feats.shape[0]} rows")
        finite = np.isfinite(feats).all(axis=1)
        if not finite.all():
            row = int(np.argmin(finite))
            sentence = int(np.searchsorted(offsets, row, side="right") - 1)
            raise ContractError(f"{where}: 'features' row {row} (sentence {sentence}) has NaN or inf values")
    if contract is TRAJECTORIES:
        losses, steps = tensors["losses"], tensors["steps"]
        if losses.shape[1] != steps.shape[0]:
            raise ContractError(f"{where}: 'losses' has {losses.shape[1]} checkpoints but 'steps' has {steps.shape[0]}")
        finite = np.isfinite(losses).all(axis=1)
        if not finite.all():
            raise ContractError(f"{where}: 'losses' row {int(np.argmin(finite))} has NaN or inf values")
