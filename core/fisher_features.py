"""Principled variants of FisherSFT's token features, applied before the greedy (issue 10, item 6).

Real pre-logit hidden states are not the isotropic features of the paper's analysis: their norms vary by an
order of magnitude between tokens, and their scale is arbitrary relative to a fixed `lam`. Each variant answers
one of those:

- `token_norm="unit"`: every token's feature scaled to norm 1, so a few outlier-norm tokens (often the first
  token of a response, or rare tokens) cannot dominate log det and the sentences that hold them.
- `lam_mode="relative"`: lam is multiplied by the pool's mean squared feature norm over d, the average
  variance per direction, so `lam: 1` means "one average token's worth of prior" whatever the model's scale.
- `whiten=True`: features multiplied by the inverse square root of the pool's token covariance, so every
  direction the pool varies in counts the same and the objective prefers what the pool rarely shows.

The defaults leave the features untouched (the paper's objective). A variant writes one float32 copy, a chunk at
a time.

`sentence_factors` is not a variant but a compact representation (issue 25, item 2): a sentence's tokens X_i
enter log det(lam I + sum X_i^T X_i) only through X_i^T X_i, so r rows F_i with F_i^T F_i = the rank-r
truncation of X_i^T X_i give exactly the same gains when the sentence's rank is at most r, and otherwise lose
at most the dropped energy over lam from each gain.
"""
from __future__ import annotations

import numpy as np
import torch

from sftcurate.core.feature_rows import ShardedRows, check_features, row_chunks
from sftcurate.data_contracts import ContractError


def second_moment(features) -> np.ndarray:
    """The pool's uncentred token covariance E[x x^T] (float64, d x d), accumulated chunk by chunk: the features
    may be memory-mapped and large."""
    rows, d = features.shape
    total = np.zeros((d, d), dtype=np.float64)
    for _, block in row_chunks(features):
        chunk = np.asarray(block, dtype=np.float64)
        total += chunk.T @ chunk
    return total / max(rows, 1)


def inverse_sqrt(matrix: np.ndarray, ridge: float = 1e-6) -> np.ndarray:
    values, vectors = np.linalg.eigh(matrix)
    floor = ridge * max(float(values.max()), 1e-12)
    return (vectors / np.sqrt(np.maximum(values, floor))) @ vectors.T


def prepare_features(features, lam: float, unit_tokens: bool = False, relative_lam: bool = False,
                     whiten: bool = False) -> tuple[np.ndarray, float]:
    """(features to run the greedy on, the lam to use). Untouched, and not copied, with the defaults; else one
    float32 copy written a chunk at a time (memory-mapped shards are never loaded whole, and no float64 copy of
    the pool is made: at 10^6 sentences, L=32, d=64 the copy is 8 GB, the float64 one was 16 GB more).
    The variants are flags, so nothing here needs checking: the selector's params model validates its
    `token_norm` and `lam_mode` where they enter."""
    if not unit_tokens and not relative_lam and not whiten:
        return features, lam
    rows, d = features.shape
    transform = inverse_sqrt(second_moment(features)) if whiten else None
    out = np.empty((rows, d), dtype=np.float32)
    squares = 0.0
    for lo, block in row_chunks(features):
        x = np.asarray(block, dtype=np.float64)
        if transform is not None:
            x = x @ transform
        if unit_tokens:
            x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        written = out[lo:lo + len(x)]
        written[:] = x
        squares += float(np.einsum("ij,ij->", written, written, dtype=np.float64))
    if relative_lam:
        lam = lam * squares / max(rows, 1) / d
    return out, lam


def feature_diagnostics(features, offsets: np.ndarray, lam: float) -> dict:
    """What the raw features look like against the objective's assumptions: token-norm spread, lam against the
    per-direction variance, the spectrum's concentration, and how much of a sentence's log det its largest
    token carries."""
    rows, d = features.shape
    norms = np.empty(rows)
    for lo, block in row_chunks(features):
        norms[lo:lo + len(block)] = np.linalg.norm(np.asarray(block, dtype=np.float64), axis=1)
    moment = second_moment(features)
    spectrum = np.sort(np.linalg.eigvalsh(moment))[::-1]
    per_direction = float(np.trace(moment)) / d
    lengths = np.diff(offsets)
    top_share = []
    for lo, hi in zip(offsets[:-1], offsets[1:]):
        if hi > lo:
            sq = norms[lo:hi] ** 2
            top_share.append(float(sq.max() / sq.sum()))
    return {
        "tokens": int(rows), "d": int(d), "sentences": int(len(lengths)),
        "norm_median": float(np.median(norms)), "norm_p99": float(np.percentile(norms, 99)),
        "norm_max": float(norms.max()), "norm_max_over_median": float(norms.max() / max(np.median(norms), 1e-12)),
        "lam_over_direction_variance": float(lam / max(per_direction, 1e-12)),
        "top1_eigen_share": float(spectrum[0] / spectrum.sum()),
        "effective_rank": float(spectrum.sum() ** 2 / (spectrum ** 2).sum()),
        "largest_token_share_median": float(np.median(top_share)) if top_share else float("nan"),
        "length_median": float(np.median(lengths)),
    }


def sentence_factors(features, offsets, rank: int, batch_rows: int = 1 << 16) -> tuple[np.ndarray, np.ndarray,
                                                                                         np.ndarray]:
    """(factor rows [R, d] float32, their offsets [N+1], each sentence's kept energy share) with
    F_i^T F_i = the best rank-`rank` approximation of X_i^T X_i: F_i = S_r V_r^T for X_i = U S V^T (`_top_factor`).

    A sentence of at most `rank` tokens keeps its rows as they are. For every sentence the gain given any
    A >= lam I satisfies
    gain(F_i) <= gain(X_i) <= gain(F_i) + tr(A^-1 E_i) <= gain(F_i) + (1 - kept_i) ||X_i||_F^2 / lam
    (E_i = X_i^T X_i - F_i^T F_i, positive semidefinite, log det(I + M) <= tr M), and equality when the
    sentence's rank is at most `rank`. Gain evaluations then cost O(r d^2) instead of O(L d^2); a token budget
    must still count the sentence's tokens (`np.diff(offsets)` of the input), not its factor rows."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    features, offsets = check_features(features, offsets)
    rows = features if isinstance(features, ShardedRows) else ShardedRows([np.asarray(features)], np.array([0]))
    d = int(features.shape[1])
    lengths = np.diff(offsets)
    rank = min(rank, d)                       # X_i^T X_i is d x d: d rows always suffice
    kept_rows = np.minimum(lengths, rank)
    out_offsets = np.concatenate([[0], np.cumsum(kept_rows)]).astype(np.int64)
    out = np.empty((int(out_offsets[-1]), d), dtype=np.float32)
    kept = np.ones(len(lengths))
    short = np.flatnonzero((lengths <= rank) & (lengths > 0))
    for lo in range(0, len(short), max(1, batch_rows // max(rank, 1))):
        part = short[lo:lo + max(1, batch_rows // max(rank, 1))]
        src = row_index(offsets, part, lengths[part])
        out[row_index(out_offsets, part, lengths[part])] = rows.take(src)
    long = np.flatnonzero(lengths > rank)
    long = long[np.argsort(lengths[long], kind="stable")]
    start = 0
    while start < len(long):
        stop = start + 1
        while stop < len(long) and int(lengths[long[stop]]) * (stop + 1 - start) <= batch_rows:
            stop += 1
        part = long[start:stop]
        width = int(lengths[part].max())
        idx = offsets[part][:, None] + np.arange(width)[None, :]
        inside = np.arange(width)[None, :] < lengths[part][:, None]
        X = torch.from_numpy(np.where(inside[..., None], rows.take(np.where(inside, idx, 0)), 0.0)).double()
        F, top = _top_factor(X, rank)
        out[out_offsets[part][:, None] + np.arange(rank)[None, :]] = F.float().numpy()
        energy = X.square().sum((1, 2))
        kept[part] = torch.where(energy > 0, (top / energy.clamp(min=1e-300)).clamp(max=1.0), 1.0).numpy()
        start = stop
    return out, out_offsets, kept


def _top_factor(X: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, rank, d] F with F^T F the rank-`rank` part of X^T X, [B] the energy it keeps) of zero-padded
    [B, width, d] float64 X, from an eigendecomposition of the smaller Gram: X X^T (width <= d: F = U_r^T X) or
    X^T X (F = Lambda_r^1/2 V_r^T). About 4x cheaper than an SVD of X at width 256, d = 128; the Gram's rounding
    (about eps * lambda_max) only reaches eigenvalues that far below the top, which a rank-r factor drops anyway.
    Zero padding rows add only zero eigenvalues."""
    wide = X.shape[1] <= X.shape[2]
    values, vectors = torch.linalg.eigh(X @ X.transpose(1, 2) if wide else X.transpose(1, 2) @ X)
    values, vectors = values.flip(-1)[:, :rank].clamp(min=0.0), vectors.flip(-1)[:, :, :rank]
    if wide:
        return vectors.transpose(1, 2) @ X, values.sum(1)
    return values.sqrt().unsqueeze(-1) * vectors.transpose(1, 2), values.sum(1)


def row_index(offsets: np.ndarray, sentences: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Row positions of `sentences`' first `lengths` rows, concatenated."""
    starts = np.repeat(offsets[sentences], lengths)
    within = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return starts + within


def stored_factors(features, offsets, rank: int) -> tuple[dict[str, np.ndarray], dict]:
    """What a token-features shard holds with `embedding.sentence_rank` = `rank`: the tensors (`features`: factor
    rows, `offsets`: into them, `tokens`: each sentence's loss tokens, which a token budget counts, and
    `kept_energy`: each sentence's share of ||X_i||_F^2 kept) and the shard's meta (the rank used, min(rank, d);
    the rows stored; kept energy min and sum over sentences, so shards combine into a pool's min and mean)."""
    features, offsets = check_features(features, offsets)
    rank = min(int(rank), int(features.shape[1]))
    factors, factor_offsets, kept = sentence_factors(features, offsets, rank)
    tensors = {"features": factors, "offsets": factor_offsets, "tokens": np.diff(offsets).astype(np.int64),
               "kept_energy": kept.astype(np.float32)}
    meta = {"sentence_rank": rank, "feature_rows": int(len(factors)),
            "kept_energy_min": float(kept.min()) if len(kept) else 1.0, "kept_energy_sum": float(kept.sum())}
    return tensors, meta


def factor_summary(shard_metas: list[dict], where: str) -> dict:
    """A token-features artifact's meta from its shards' (`stored_factors`): the sentence rank, the factor rows
    stored, and the kept energy's min and mean over the pool's sentences; {} for shards of tokens. Shards stored
    with different ranks (or some as tokens) do not make one pool's features."""
    ranks = {m.get("sentence_rank") for m in shard_metas}
    if len(ranks) > 1:
        raise ContractError(f"{where}: the feature shards were stored with different embedding.sentence_rank "
                            f"values ({sorted(ranks, key=str)}); re-run the embedding stage")
    rank = ranks.pop() if ranks else None
    if rank is None:
        return {}
    sentences = sum(m["rows"] for m in shard_metas)
    return {"sentence_rank": rank, "feature_rows": sum(m["feature_rows"] for m in shard_metas),
            "kept_energy_min": min(m["kept_energy_min"] for m in shard_metas),
            "kept_energy_mean": sum(m["kept_energy_sum"] for m in shard_metas) / max(sentences, 1)}
