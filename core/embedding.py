"""FisherSFT token features: for every loss token, the target model's pre-logit hidden state that predicts it.

For a loss position t of an example, the feature is the last hidden state at position t-1 (after the final
norm, so `lm_head(feature)` is the logit vector that predicts token t). The forward pass runs the model's base
transformer only (no vocabulary projection), in length-grouped batches, under `torch.inference_mode`, bf16 on
GPU, and the output is streamed shard by shard (`cfg.embedding.shard_size` examples), so memory stays bounded.

Every shard is its own stage (`embed_shard`, a "token_features_shard" artifact holding `features.safetensors`:
`features` float32 [T, d], `offsets` int64 [n+1], contract TOKEN_FEATURES; and `ids.parquet`, contract
TOKEN_FEATURES_IDS), mapped over the task runner by `tasks.curate`. The final artifact "token_features"
(`commit_features`) holds `shards.json`, the shards in pool order by reference (no copy of their bytes), and
its manifest, written last; `core.inputs` memory-maps the shard files. With `d_proj` set, features are reduced by a seeded Gaussian random projection or by PCA (top
right-singular vectors of the uncentred features of a sample), fitted once by `fit_projection`.

The same artifact serves "sentence_embeddings" (DensitySampling): the mean of an example's token features.
"""
from __future__ import annotations

import logging
from typing import Iterator

import numpy as np
import pyarrow as pa
import torch

from sftcurate.data_contracts import TOKEN_FEATURES, TOKEN_FEATURES_IDS, ContractError, TensorContract
from sftcurate.core.ingest import load_pool, shard_bounds
from sftcurate.core.fisher_features import factor_summary, stored_factors
from sftcurate.core.inputs import SHARD_REFS, load_features_file, mean_pool, read_features_artifact  # noqa: F401  (re-exported)
from sftcurate.core.inputs import SENTENCE_RANK
from sftcurate.infra import progress
from sftcurate.infra.models import resolve_device, resolve_model
from sftcurate.data_contracts.manifests import FeatureShardMeta, ProjectionMeta, TokenFeaturesMeta
from sftcurate.infra.stages import Built, build_once, content_key, read_meta
from sftcurate.infra.store import join, read_tensors, root_of
from sftcurate.core.packing import DEVICE_BATCH_TOKENS, pack, packed_batches, packed_hidden, packs
from sftcurate.core.tokenize import Encoded, encode_pairs, example_rows, length_grouped_batches, pad_batch

log = logging.getLogger("sftcurate.embedding")

KIND = "token_features"
SHARD_KIND = "token_features_shard"
PROJECTION_KIND = "feature_projection"
PROJECTION = TensorContract(name="feature_projection", version=1, tensors={"matrix": ("float", 2)}, ids_sidecar="")
PROJECTION_SEED = 0          # the random projection is part of the artifact key; a fixed seed keeps reuse
PCA_SAMPLE = 256             # examples embedded to fit a PCA projection


# ---------------------------------------------------------------- the math

def resolve_device_dtype(device: str | None = None, dtype: str | None = "auto"):
    dev = torch.device(resolve_device(device))
    if dtype in (None, "auto"):
        tdtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    else:
        tdtype = getattr(torch, dtype)
    return dev, tdtype


def last_hidden(model, ids, attn=None):
    """Final hidden states [B, W, d] after the final norm (the input of the vocabulary projection).

    Batches are right-padded and the model is causal, so a real token never attends to a pad (pads come after
    it) and positions are 0..n-1 as without padding: no attention mask is needed for the rows we keep, and
    leaving it out keeps attention on the plain causal kernel (a padding mask forces a slower masked path)."""
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if base is not None and base is not model:
        return base(input_ids=ids, attention_mask=attn).last_hidden_state
    return model(input_ids=ids, attention_mask=attn, output_hidden_states=True).hidden_states[-1]


def _layout(model, encoded: list[Encoded], device, projection):
    """What both feature paths start from: (device, loss rows per example, offsets, the zeroed output, the
    projection on the device or None, example lengths)."""
    device = device or next(model.parameters()).device
    counts = np.array([e.n_loss for e in encoded], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    d_out = projection.shape[1] if projection is not None else int(model.config.hidden_size)
    out = np.zeros((int(offsets[-1]), d_out), dtype=np.float32)
    proj = None if projection is None else torch.as_tensor(np.asarray(projection, np.float32), device=device)
    return device, counts, offsets, out, proj, np.array([len(e.input_ids) for e in encoded], dtype=np.int64)


def embed_encoded(model, encoded: list[Encoded], batch_tokens: int, device=None, projection=None,
                  pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(features float32 [T, d'], offsets int64 [n+1]) of already-encoded examples, in input order."""
    device, counts, offsets, out, proj, lengths = _layout(model, encoded, device, projection)
    if not encoded:
        return out, offsets
    done = 0
    with torch.inference_mode():
        for batch in length_grouped_batches(lengths, batch_tokens):
            done += len(batch)
            progress.step("token features", done, len(encoded), unit="examples")
            ids, attn, lmask = (t.to(device) for t in pad_batch([encoded[i] for i in batch], pad_id))
            sel = lmask[:, 1:].bool()            # position t-1 predicts the loss token at t
            if not bool(sel.any()):
                continue
            h = last_hidden(model, ids)[:, :-1][sel].float()  # right padding: no mask needed
            if proj is not None:
                h = h @ proj
            h = h.cpu().numpy()
            # rows come out example by example (row-major over the batch), each in position order
            pos = 0
            for i in batch:
                n = int(counts[i])
                out[offsets[i]:offsets[i] + n] = h[pos:pos + n]
                pos += n
    return out, offsets


class _Drain:
    """Feature rows from the device into a host array through two pinned buffers: the copy of one batch runs
    while the next batch's forward does, and a buffer is read out only once its copy has finished (an event),
    so the host never waits for the device in between."""

    def __init__(self, out: np.ndarray, rows: int, device):
        self.out, self.on_gpu, self.turn = out, torch.device(device).type == "cuda", 0
        self.buffers = _pinned_pair(rows, out.shape[1]) if self.on_gpu else []
        self.pending: list = [None, None]

    def put(self, h, dest: np.ndarray) -> None:
        if not self.on_gpu:
            self.out[dest] = h.numpy()
            return
        k, self.turn = self.turn % 2, self.turn + 1
        self._read(k)
        buf = self.buffers[k][:len(h)]
        buf.copy_(h, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.pending[k] = (buf, dest, event)

    def _read(self, k: int) -> None:
        if self.pending[k] is not None:
            buf, dest, event = self.pending[k]
            event.synchronize()
            self.out[dest] = buf.numpy()
            self.pending[k] = None

    def close(self) -> None:
        for k in range(len(self.pending)):
            self._read(k)


def _pinned_pair(rows: int, d: int) -> list:
    """Two page-locked host buffers, kept between calls: pinning hundreds of MB costs more than a forward."""
    if _PINNED.get("shape") != (rows, d):
        _PINNED.update(shape=(rows, d), buffers=[torch.empty((rows, d), dtype=torch.float32, pin_memory=True)
                                                  for _ in range(2)])
    return _PINNED["buffers"]


_PINNED: dict = {}


def embed_packed(model, encoded: list[Encoded], batch_tokens: int, device=None, projection=None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """`embed_encoded`'s features through packed batches (`core.packing`): no compute on padding, only the loss
    rows leave the model's body, projected on the device and drained to the host while the next batch runs."""
    device, counts, offsets, out, proj, lengths = _layout(model, encoded, device, projection)
    if not encoded:
        return out, offsets
    drain = _Drain(out, max(min(batch_tokens, len(out)), int(counts.max())), device)
    done = 0
    with torch.inference_mode():
        for batch in packed_batches(lengths, batch_tokens):
            pb = pack([encoded[i] for i in batch], device)
            h = packed_hidden(model, pb).float()
            if proj is not None:
                h = h @ proj
            # packed rows run example by example in batch order, each in position order
            drain.put(h, np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in batch]))
            done += len(batch)
            progress.step("token features", done, len(encoded), unit="examples")
        drain.close()
    return out, offsets


def embed_examples(model, tokenizer, examples, max_length: int, batch_tokens: int = 4096, dtype: str | None = "auto",
                   device: str | None = None, shard_size: int = 2048, projection=None
                   ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (features, offsets) for consecutive shards of `shard_size` examples ((prompt, response) pairs).

    The model is moved to `device` and cast to `dtype` ("auto": bf16 on GPU, fp32 on CPU); features are
    float32. `projection` ([d, d_proj]) is applied on the device before the copy back. On a GPU in half precision
    batches are packed and at least DEVICE_BATCH_TOKENS tokens (`embed_packed`); elsewhere length-grouped and
    right-padded (`embed_encoded`), as the CPU has always run."""
    dev, tdtype = resolve_device_dtype(device, dtype)
    model.to(device=dev, dtype=tdtype)
    model.eval()
    examples = list(examples)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    packed = packs(model)
    for lo in range(0, max(len(examples), 1), shard_size):
        encoded = encode_pairs(tokenizer, examples[lo:lo + shard_size], max_length)
        if packed:
            yield embed_packed(model, encoded, max(batch_tokens, DEVICE_BATCH_TOKENS), dev, projection)
        else:
            yield embed_encoded(model, encoded, batch_tokens, dev, projection, pad_id)


def embed_one_by_one(model, tokenizer, examples, max_length: int, device: str | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Reference loop: one full forward (logits and all hidden states) per example, batch size 1."""
    dev, _ = resolve_device_dtype(device, "float32")
    feats, counts = [], []
    with torch.inference_mode():
        for e in encode_pairs(tokenizer, examples, max_length):
            ids = torch.tensor([e.input_ids], device=dev)
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
            sel = torch.tensor(e.loss_mask[1:], dtype=torch.bool, device=dev)
            feats.append(out.hidden_states[-1][0, :-1][sel].float().cpu().numpy())
            counts.append(int(sel.sum()))
    d = int(model.config.hidden_size)
    features = np.concatenate(feats) if feats else np.zeros((0, d), np.float32)
    return features.astype(np.float32), np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def random_projection(d: int, d_proj: int, seed: int = PROJECTION_SEED) -> np.ndarray:
    """Gaussian [d, d_proj] with entries N(0, 1/d_proj): E[P P^T] = I, so squared norms and X^T X quadratic
    forms are preserved in expectation (Johnson-Lindenstrauss)."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((d, d_proj)) / np.sqrt(d_proj)).astype(np.float32)


def pca_projection(sample: np.ndarray, d_proj: int) -> np.ndarray:
    """Top `d_proj` right-singular vectors of the UNcentred sample [T, d] (orthonormal columns [d, d_proj]):
    they keep the largest share of the second-moment matrix X^T X that the log-det objective is built on."""
    x = np.asarray(sample, dtype=np.float64)
    if x.shape[0] == 0:
        raise ValueError("pca projection: the sample has no feature rows")
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    if vt.shape[0] < d_proj:
        raise ValueError(f"pca projection: the sample spans {vt.shape[0]} dimensions, fewer than d_proj={d_proj}")
    return vt[:d_proj].T.astype(np.float32)


# ---------------------------------------------------------------- pool access

def pool_pairs(pool: pa.Table) -> list[tuple[str, str, str]]:
    return example_rows(pool)


# ---------------------------------------------------------------- stages (infra.stages.build_once)

def fit_projection(examples_uri: str, model_spec: str, model_fp: str, d_proj: int, method: str, max_length: int,
                   batch_tokens: int, dtype: str, store_root: str | None = None) -> Built:
    """The [d, d_proj] projection matrix artifact (random: seeded Gaussian; pca: fitted on a pool sample)."""
    def build(writer) -> None:
        loaded = resolve_model(model_spec)
        d = int(loaded.model.config.hidden_size)
        if not 0 < d_proj <= d:
            raise ContractError(f"embedding.d_proj: {d_proj} must be in 1..{d} (the model's hidden size)")
        if method == "random":
            matrix = random_projection(d, d_proj)
        else:
            pool = load_pool(examples_uri)
            rng = np.random.default_rng(PROJECTION_SEED)
            take = np.sort(rng.choice(pool.num_rows, size=min(PCA_SAMPLE, pool.num_rows), replace=False))
            pairs = pool_pairs(pool)
            feats, _ = next(embed_examples(loaded.model, loaded.tokenizer, [pairs[i] for i in take], max_length,
                                           batch_tokens, dtype, shard_size=len(take) or 1))
            matrix = pca_projection(feats, d_proj)
        writer.write_tensors("projection.safetensors", {"matrix": matrix}, PROJECTION)
        writer.meta.update({"method": method, "d": d, "d_proj": d_proj, "model": model_spec})

    params = {"model": model_fp, "d_proj": d_proj, "method": method, "seed": PROJECTION_SEED,
              "max_length": max_length}
    upstream = {"examples": examples_uri} if method == "pca" else {}  # a random projection is pool-independent
    return build_once(PROJECTION_KIND, __name__, params, build, upstream=upstream, store_root=store_root,
                      meta=ProjectionMeta)


def load_projection(projection_uri: str | None) -> np.ndarray | None:
    if not projection_uri:
        return None
    tensors, _ = read_tensors(join(projection_uri, "projection.safetensors"), PROJECTION)
    return tensors["matrix"].astype(np.float32)


def embed_shard(examples_uri: str, shard_index: int, shard_size: int, model_spec: str, model_fp: str,
                max_length: int, batch_tokens: int, dtype: str = "auto", projection_uri: str | None = None,
                store_root: str | None = None, sentence_rank: int | None = None) -> Built:
    """One shard of the pool's token features (computed and committed unless it already is). With
    `sentence_rank` r it stores each sentence's rank-r factor instead of its tokens (`embedding.sentence_rank`,
    `core.fisher_features.stored_factors`); the ids' n_tokens stay the loss tokens."""
    def build(writer) -> None:
        pool = load_pool(examples_uri)
        lo, hi = shard_bounds(pool.num_rows, shard_index, shard_size)
        pairs = pool_pairs(pool.slice(lo, hi - lo))
        loaded = resolve_model(model_spec)
        projection = load_projection(projection_uri)
        feats, offsets = next(embed_examples(loaded.model, loaded.tokenizer, pairs, max_length, batch_tokens, dtype,
                                             shard_size=max(len(pairs), 1), projection=projection))
        ids = pa.table({"id": pool.column("id").slice(lo, hi - lo),
                        "pool_index": np.arange(lo, hi, dtype=np.int64), "n_tokens": np.diff(offsets)})
        tensors, factors = {"features": feats, "offsets": offsets}, {}
        if sentence_rank:
            tensors, factors = stored_factors(feats, offsets, sentence_rank)
        writer.write_tensors("features.safetensors", tensors, TOKEN_FEATURES,
                             {SENTENCE_RANK: str(factors["sentence_rank"])} if factors else None)
        writer.write_table("ids.parquet", ids, TOKEN_FEATURES_IDS)
        writer.meta.update({"shard_index": shard_index, "shard_size": shard_size, "rows": int(hi - lo),
                            "tokens": int(offsets[-1]), "d": int(feats.shape[1]), "model": model_spec,
                            "projection_uri": projection_uri, **factors})

    # batch_tokens changes speed only (the batched output equals the one-by-one loop), so it stays out of the key
    params = {"shard_index": shard_index, "shard_size": shard_size, "model": model_fp, "max_length": max_length,
              "dtype": dtype, **({"sentence_rank": int(sentence_rank)} if sentence_rank else {})}
    upstream = {"examples": examples_uri, "projection": projection_uri}
    return build_once(SHARD_KIND, __name__, params, build, upstream=upstream, store_root=store_root,
                      meta=FeatureShardMeta)


def commit_features(examples_uri: str, shard_uris: list[str], store_root: str | None = None) -> Built:
    """The "token_features" artifact: `shards.json` referencing the committed shards (in order), never a copy of
    their bytes (a 10^6-sentence pool is 8 GB; the store keeps it once and readers memory-map the shard files).
    Checks the shards tile the pool and agree on d. A reference names the shard by its store-relative folder
    `<kind>/<key>`, so a moved or synced store still resolves it; the shard's key is content-addressed like
    this artifact's, so a wiped shard comes back under the same name and the reference stays valid."""

    def build(writer) -> None:
        n_pool = load_pool(examples_uri).num_rows
        metas = [read_meta(u, FeatureShardMeta) for u in shard_uris]
        rows = sum(m.rows for m in metas)
        if rows != n_pool:
            raise ContractError(f"{examples_uri}: the pool has {n_pool} examples but the feature shards hold {rows}; "
                                "re-run the embedding shards")
        dims = {m.d for m in metas}
        if len(dims) > 1:
            raise ContractError(f"feature shards disagree on d ({sorted(dims)}); re-run the embedding stage")
        root = root_of(writer.uri)
        refs = []
        for k, (u, meta) in enumerate(zip(shard_uris, metas)):
            ref = {"index": k, "key": content_key(u), "rows": meta.rows, "tokens": meta.tokens}
            u = str(u).rstrip("/")
            if u.startswith(root + "/"):
                ref["artifact"] = u[len(root) + 1:]
            else:  # a shard kept in another store: referenced by its full URI
                ref["uri"] = u
            refs.append(ref)
        writer.write_json(SHARD_REFS, {"shards": refs})
        writer.meta.update({"examples_uri": examples_uri, "n_examples": n_pool, "shards": len(shard_uris),
                            "layout": "shard_refs",
                            "tokens": int(sum(m.tokens for m in metas)), "d": dims.pop() if dims else None,
                            "model": metas[0].model if metas else None,
                            "projection_uri": metas[0].projection_uri if metas else None,
                            **factor_summary([m.model_dump() for m in metas], examples_uri)})

    return build_once(KIND, __name__, {}, build, upstream={"examples": examples_uri, "shards": list(shard_uris)},
                      store_root=store_root, meta=TokenFeaturesMeta)


# ---------------------------------------------------------------- readers
