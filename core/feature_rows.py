"""Token-feature rows [T, d] with sentence offsets [N+1]: the checks every FisherSFT input passes, and rows held
as consecutive blocks (memory-mapped shard files) read in place, never concatenated."""
from __future__ import annotations

import numpy as np
import torch


def check_features(features, offsets, where: str = "features") -> tuple[np.ndarray | torch.Tensor, np.ndarray]:
    """Shape/monotonicity/finiteness checks for in-memory inputs (files go through the data contract)."""
    offsets = np.asarray(offsets)
    if getattr(features, "ndim", None) != 2:
        raise ValueError(f"{where}: 'features' must be 2-D [tokens, d], got shape {tuple(features.shape)}")
    if offsets.ndim != 1 or offsets.size < 1 or offsets[0] != 0:
        raise ValueError(f"{where}: 'offsets' must be 1-D and start at 0")
    if (np.diff(offsets) < 0).any():
        bad = int(np.argmax(np.diff(offsets) < 0))
        raise ValueError(f"{where}: 'offsets' not monotone at sentence {bad}")
    if int(offsets[-1]) != features.shape[0]:
        raise ValueError(f"{where}: 'offsets' ends at {int(offsets[-1])} but 'features' has {features.shape[0]} rows")
    return features, offsets.astype(np.int64)


class ShardedRows:
    """Feature rows [T, d] held as consecutive blocks (memory-mapped shard files, or one array), read in place.

    `take(idx)` gathers rows by global index (any shape) without ever concatenating the blocks, so a pool whose
    features do not fit in memory twice is read straight from its shard files."""

    def __init__(self, blocks: list, starts: np.ndarray):
        self.blocks = blocks
        self.starts = np.asarray(starts, dtype=np.int64)   # first global row of every block
        d = {int(b.shape[1]) for b in blocks}
        if len(d) != 1:
            raise ValueError(f"feature blocks disagree on d ({sorted(d)})")
        self.shape = (int(self.starts[-1]) + int(blocks[-1].shape[0]), d.pop())
        self.ndim = 2
        self.dtype = blocks[0].dtype

    def take(self, idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        if len(self.blocks) == 1:
            return self.blocks[0][idx]
        out = np.empty(idx.shape + (self.shape[1],), dtype=self.dtype)
        which = np.searchsorted(self.starts, idx, side="right") - 1
        for b in np.unique(which):
            m = which == b
            out[m] = self.blocks[b][idx[m] - self.starts[b]]
        return out

    def chunks(self, rows: int = 1 << 18):
        """(global start, block slice) pieces of at most `rows` rows, in order: for one streaming pass."""
        for start, block in zip(self.starts.tolist(), self.blocks):
            for lo in range(0, block.shape[0], rows):
                yield start + lo, block[lo:lo + rows]

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        """Rows by a slice, an index or an index array (a copy of just those rows), as a numpy array would."""
        if isinstance(key, tuple):
            return self[key[0]][(slice(None),) + key[1:]] if len(key) > 1 else self[key[0]]
        if isinstance(key, slice):
            return self.take(np.arange(*key.indices(self.shape[0])))
        idx = np.asarray(key, dtype=np.int64)
        return self.take(np.where(idx < 0, idx + self.shape[0], idx))

    def __array__(self, dtype=None, copy=None):
        """The rows as one in-memory array: a full copy, for callers that transform every row anyway (feature
        variants, diagnostics, tests). The greedy never calls it."""
        out = np.concatenate(self.blocks) if len(self.blocks) > 1 else np.array(self.blocks[0])
        return out if dtype is None else out.astype(dtype, copy=False)


def row_chunks(features, rows: int = 1 << 18):
    """(global start, rows) pieces of a [T, d] array or `ShardedRows`, in order, each at most `rows` rows."""
    if isinstance(features, ShardedRows):
        yield from features.chunks(rows)
        return
    for lo in range(0, features.shape[0], rows):
        yield lo, features[lo:lo + rows]
