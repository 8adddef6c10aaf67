"""The target a selection aims at (`selection.target`): a file of target records (any format ingest reads) whose
token features are an artifact of their own, made with the same model, template and projection as the pool's.

The requirement `target_features`: its name and the check every selector aiming at a target makes live here
(this module imports no other of the project's: the selectors import it while their package is being
imported); how it is read and made, and its one declaration (`core.selectors.base.declare`), are in
`core.target_records`, which imports ingest and the embedding stage:

- made by the curate flow: target-ingest (the records, no held-out split), embed-target (one shard: target
  sets are small), commit-target-features (a token-features artifact of the target);
- read by a selection into `inputs.extra["target_features"] = (features [T, d], offsets [M+1])`;
- read by `sftcurate select` from `--target-features FILE` (a `.safetensors` file with `features` and
  `offsets`, or a token-features artifact folder).

The requirement `target_trajectories` (S2L with a target): the target's records ingested the same way, their
losses at every checkpoint of the proxy trained on the pool (`--target-trajectories FILE` on the command line).

A selector needs a target when a target requirement is in its `requires` (similarity, fishersft_target); it
aims at one optionally when only its `requirements(target=True)` lists one (S2L, FisherSFT): then it reads the
target when `selection.target` is set and runs as before when it is not.

Its key is the target records' content, the model, the template and the projection: editing the target file
re-embeds the target only; the pool's features are reused.
"""
from __future__ import annotations

import numpy as np

from sftcurate.data_contracts import UserError

TARGET_FEATURES = "target_features"
TARGET_TRAJECTORIES = "target_trajectories"   # S2L: the target's losses at the pool proxy's checkpoints
TARGETS = (TARGET_FEATURES, TARGET_TRAJECTORIES)


def needs_target(cls) -> bool:
    """Whether selector class `cls` cannot run without a target (it requires one)."""
    return any(name in TARGETS for name in cls.requires)


def reads_target(cls) -> bool:
    """Whether selector class `cls` reads a target when one is set (it needs one, or aims at one optionally)."""
    return any(name in TARGETS for name in cls.requirements(target=True))


class TargetError(UserError):
    """The target records are missing, empty or unreadable, or a selector needs a target and none is set."""


def checked_target(features, offsets, where: str):
    """The target's (features, offsets), refused in one line when it holds no loss token."""
    offsets = np.asarray(offsets, dtype=np.int64)
    if len(offsets) < 2 or int(offsets[-1]) == 0:
        raise TargetError(f"{where}: the target holds no loss tokens ({len(offsets) - 1} examples); "
                          "give target records with responses")
    return features, offsets


def target_features(inputs, d: int, method: str):
    """The loaded target (features, offsets), checked against the pool's feature width d."""
    if TARGET_FEATURES not in inputs.extra:
        raise ValueError(f"{method}: no target features were loaded (requirement '{TARGET_FEATURES}')")
    features, offsets = inputs.extra[TARGET_FEATURES]
    if int(features.shape[1]) != int(d):
        raise TargetError(f"{method}: the target's features have d={features.shape[1]} but the pool's have d={d}; "
                          "embed both with the same model and projection")
    return features, offsets
