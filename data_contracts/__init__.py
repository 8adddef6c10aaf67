"""Schemas of every artifact that crosses a task boundary, validated on write and on read."""
from sftcurate.data_contracts.errors import DependencyError, UserError
from sftcurate.data_contracts.schemas import (
    CONTRACTS,
    Contract,
    ContractError,
    EXAMPLES,
    SELECTION,
    TOKEN_FEATURES_IDS,
    TRAJECTORIES_IDS,
    JUDGMENTS,
    GENERATIONS,
    HELDOUT_LOSSES,
    EVAL_RESULTS,
    validate_table,
)
from sftcurate.data_contracts.tensors import TensorContract, TOKEN_FEATURES, TRAJECTORIES, validate_tensors

__all__ = [
    "UserError", "DependencyError",
    "CONTRACTS", "Contract", "ContractError", "EXAMPLES", "SELECTION", "TOKEN_FEATURES_IDS",
    "TRAJECTORIES_IDS", "JUDGMENTS", "GENERATIONS", "HELDOUT_LOSSES", "EVAL_RESULTS", "validate_table", "TensorContract",
    "TOKEN_FEATURES", "TRAJECTORIES", "validate_tensors",
]
