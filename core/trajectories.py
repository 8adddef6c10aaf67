"""S2L loss trajectories: for every pool example and every proxy checkpoint, the mean loss over its loss tokens.

Work is cut into shards of the pool (`trajectory_shard_task`, one committed artifact per shard, so shards can
be mapped over a task runner such as Dask and a retry recomputes only what is missing). Inside a shard the
examples are tokenized once, then each checkpoint makes one pass over them in length-grouped batches
(`core.tokenize.length_grouped_batches`, `proxy.batch_tokens` padded tokens per forward) under
`torch.inference_mode`. `trajectory_commit_task` concatenates the shards in pool order and commits the
"trajectories" artifact: `trajectories.safetensors` (`losses` float32 [N, T], `steps` int64 [T]) and
`ids.parquet`, plus a summary (mean loss per checkpoint, a PNG of sample trajectories coloured by cluster)
sent to MLflow and to a Prefect markdown artifact.
"""
from __future__ import annotations

import io
import logging

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from sftcurate.data_contracts import TRAJECTORIES, TRAJECTORIES_IDS, ContractError
from sftcurate.core.ingest import load_pool, shard_bounds
from sftcurate.core.inputs import load_trajectories_file  # noqa: F401  (re-exported)
from sftcurate.core.selectors.s2l import kmeans
from sftcurate.core.proxy import load_checkpoint_model, load_tokenizer, proxy_checkpoints, proxy_info
from sftcurate.infra import progress, tracking
from sftcurate.infra.models import default_device
from sftcurate.data_contracts.manifests import TrajectoriesMeta, TrajectoryShardMeta
from sftcurate.infra.stages import Built, build_once, read_meta
from sftcurate.infra.store import join, read_bytes, read_tensors
from sftcurate.core.head_loss import packed_token_losses
from sftcurate.core.packing import DEVICE_BATCH_TOKENS, LOGITS_FROM_HIDDEN, pack, packed_batches, packs
from sftcurate.core.tokenize import Encoded, encode_pairs, example_rows, length_grouped_batches, pad_batch

log = logging.getLogger("sftcurate.trajectories")

KIND = "trajectories"
SHARD_KIND = "trajectory_shard"
SUMMARY_SAMPLE = 300          # trajectories drawn in the PNG
SUMMARY_CLUSTERS = 8
# On CPU, activations of bigger batches spill out of cache: with the tiny proxy, 1-2k padded tokens per batch
# ran 1.5-2x faster than 8k (benchmarks/bench_s2l.py). proxy.batch_tokens is honoured up to this on CPU.
CPU_BATCH_TOKENS = 2048


# ---------------------------------------------------------------- the math



def loss_position_logits(model, ids, attn, sel):
    """Logits predicting the tokens at loss positions: [n_loss, vocab] for `sel` = loss_mask[:, 1:]."""
    head = model.get_output_embeddings()
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if head is not None and base is not None and getattr(model.config, "model_type", None) in LOGITS_FROM_HIDDEN:
        hidden = base(input_ids=ids, attention_mask=attn).last_hidden_state[:, :-1]
        return head(hidden[sel])
    return model(input_ids=ids, attention_mask=attn).logits[:, :-1][sel]


def example_losses(model, encoded: list[Encoded], batch_tokens: int, device: str = "cpu",
                   max_batch: int = 256) -> np.ndarray:
    """Mean loss over each example's loss tokens: batched, length-grouped, one pass. float32 [n].

    Batches hold at most `batch_tokens` padded tokens (at most CPU_BATCH_TOKENS on CPU) and `max_batch` rows.
    """
    out = np.zeros(len(encoded), dtype=np.float32)
    if not encoded:
        return out
    if packs(model):
        return packed_example_losses(model, encoded, max(batch_tokens, DEVICE_BATCH_TOKENS))
    if not str(device).startswith("cuda"):
        batch_tokens = min(batch_tokens, CPU_BATCH_TOKENS)
    lengths = np.array([len(e.input_ids) for e in encoded], dtype=np.int64)
    pad_id = 0
    model.eval()
    done = 0
    with torch.inference_mode():
        for batch in length_grouped_batches(lengths, batch_tokens, max_batch):
            ids, attn, lmask = (t.to(device) for t in pad_batch([encoded[i] for i in batch], pad_id))
            sel = lmask[:, 1:].bool()
            rows = sel.nonzero()[:, 0]
            logits = loss_position_logits(model, ids, attn, sel)
            ce = F.cross_entropy(logits.float(), ids[:, 1:][sel], reduction="none")
            sums = torch.zeros(len(batch), dtype=torch.float64, device=device).index_add_(0, rows, ce.double())
            counts = sel.sum(1).clamp(min=1)
            out[batch] = (sums / counts).float().cpu().numpy()
            done += len(batch)
            progress.step("losses", done, len(encoded), unit="examples")
    return out


def packed_example_losses(model, encoded: list[Encoded], batch_tokens: int) -> np.ndarray:
    """`example_losses` through packed batches (`core.packing`): no padding, the vocabulary projection on loss
    rows only, the per-example sums kept on the device and copied back once."""
    device = next(model.parameters()).device
    lengths = np.array([len(e.input_ids) for e in encoded], dtype=np.int64)
    sums = torch.zeros(len(encoded), dtype=torch.float64, device=device)
    counts = np.array([max(sum(e.loss_mask[1:]), 1) for e in encoded], dtype=np.float64)
    model.eval()
    done = 0
    with torch.inference_mode():
        for batch in packed_batches(lengths, batch_tokens):
            pb = pack([encoded[i] for i in batch], device)
            rows = torch.as_tensor(batch, device=device)[pb.loss_example]
            sums.index_add_(0, rows, packed_token_losses(model, pb).double())
            done += len(batch)
            progress.step("losses", done, len(encoded), unit="examples")
    return (sums.cpu().numpy() / counts).astype(np.float32)


def example_losses_one_by_one(model, encoded: list[Encoded], device: str = "cpu") -> np.ndarray:
    """The reference loop of the official S2L code: one forward pass per example (batch size 1)."""
    out = np.zeros(len(encoded), dtype=np.float32)
    model.eval()
    with torch.inference_mode():
        for i, e in enumerate(encoded):
            ids = torch.tensor([e.input_ids], device=device)
            labels = torch.tensor([[t if m else -100 for t, m in zip(e.input_ids, e.loss_mask)]], device=device)
            if e.n_loss:
                out[i] = float(model(input_ids=ids, labels=labels).loss)
    return out


def shard_losses(proxy_uri: str, examples_uri: str, shard_index: int, shard_size: int, batch_tokens: int,
                 device: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(losses float32 [n_shard, T], steps int64 [T]) of one shard of the pool, one pass per checkpoint."""
    info = proxy_info(proxy_uri)
    device = device or default_device()
    pool = load_pool(examples_uri)
    lo, hi = shard_bounds(pool.num_rows, shard_index, shard_size)
    encoded = encode_pairs(load_tokenizer(proxy_uri), example_rows(pool.slice(lo, hi - lo)), info.max_length)
    ckpts = proxy_checkpoints(proxy_uri)
    losses = np.zeros((len(encoded), len(ckpts)), dtype=np.float32)
    for t, (_step, ckpt_uri) in enumerate(ckpts):
        model = load_checkpoint_model(proxy_uri, ckpt_uri, info.spec, info.lora).to(device)
        losses[:, t] = example_losses(model, encoded, batch_tokens, device)
        del model
    return losses, np.array([s for s, _ in ckpts], dtype=np.int64)


# ---------------------------------------------------------------- stages (infra.stages.build_once)

def trajectory_shard(proxy_uri: str, examples_uri: str, shard_index: int, shard_size: int, batch_tokens: int,
                     store_root: str | None = None) -> Built:
    """One shard's losses at every checkpoint (computed and committed unless it already is)."""

    def build(writer) -> None:
        losses, steps = shard_losses(proxy_uri, examples_uri, shard_index, shard_size, batch_tokens)
        writer.write_tensors("losses.safetensors", {"losses": losses, "steps": steps}, TRAJECTORIES)
        writer.meta.update({"shard_index": shard_index, "shard_size": shard_size, "rows": int(losses.shape[0]),
                            "proxy_uri": proxy_uri})

    # batch_tokens changes speed only, so it stays out of the key
    return build_once(SHARD_KIND, __name__, {"shard_index": shard_index, "shard_size": shard_size}, build,
                      upstream={"proxy": proxy_uri, "examples": examples_uri}, store_root=store_root,
                      meta=TrajectoryShardMeta)


def commit_trajectories(proxy_uri: str, examples_uri: str, shard_uris: list[str],
                        store_root: str | None = None) -> Built:
    """Concatenate shard losses in pool order and commit the trajectories artifact (with its summary PNG)."""

    def build(writer) -> None:
        parts, steps = [], None
        for u in shard_uris:
            tensors, _ = read_tensors(join(u, "losses.safetensors"), TRAJECTORIES)
            parts.append(tensors["losses"].astype(np.float32))
            steps = tensors["steps"]
        losses = np.concatenate(parts, axis=0) if parts else np.zeros((0, 0), dtype=np.float32)
        pool = load_pool(examples_uri)
        if losses.shape[0] != pool.num_rows:
            raise ContractError(f"{examples_uri}: {pool.num_rows} pool examples but the shards hold "
                                f"{losses.shape[0]} rows; re-run the trajectory shards")
        ids = pa.table({"id": pool.column("id"), "pool_index": np.arange(pool.num_rows, dtype=np.int64),
                        "source": pool.column("source")})
        summary = summarize(losses, steps)
        writer.write_tensors("trajectories.safetensors", {"losses": losses, "steps": steps}, TRAJECTORIES,
                             metadata={"proxy_uri": proxy_uri})
        writer.write_table("ids.parquet", ids, TRAJECTORIES_IDS)
        png_uri = writer.write_bytes("summary.png", summary["png"]) if summary["png"] else None
        writer.meta.update({"proxy_uri": proxy_uri, "examples_uri": examples_uri,
                            "n_examples": int(losses.shape[0]), "steps": steps.tolist(),
                            "mean_loss": summary["mean"], "std_loss": summary["std"], "summary_png": png_uri,
                            "shards": list(shard_uris)})

    return build_once(KIND, __name__, {}, build,
                      upstream={"proxy": proxy_uri, "examples": examples_uri, "shards": list(shard_uris)},
                      store_root=store_root, meta=TrajectoriesMeta)


def summarize(losses: np.ndarray, steps: np.ndarray, seed: int = 0) -> dict:
    """Mean/std loss per checkpoint and a PNG of sample trajectories coloured by k-means cluster."""
    mean = [float(x) for x in losses.mean(axis=0)] if losses.size else []
    std = [float(x) for x in losses.std(axis=0)] if losses.size else []
    return {"mean": mean, "std": std, "png": trajectory_png(losses, steps, seed) if losses.size else b""}


def trajectory_png(losses: np.ndarray, steps: np.ndarray, seed: int = 0) -> bytes:
    import matplotlib  # deferred on purpose: matplotlib (seconds), for the summary plot only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, _ = kmeans(losses, min(SUMMARY_CLUSTERS, losses.shape[0]), seed=seed)
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(losses.shape[0], size=min(SUMMARY_SAMPLE, losses.shape[0]), replace=False))
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    cmap = plt.get_cmap("tab10")
    for i in sample:
        ax.plot(steps, losses[i], color=cmap(int(labels[i]) % 10), alpha=0.35, linewidth=0.8)
    ax.plot(steps, losses.mean(axis=0), color="black", linewidth=2.5, label="pool mean")
    ax.set_xlabel("proxy training step")
    ax.set_ylabel("mean loss over loss tokens")
    ax.set_title(f"S2L loss trajectories ({len(sample)} of {losses.shape[0]}, coloured by cluster)")
    ax.legend(loc="upper right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def summary_markdown(uri: str) -> str:
    """The committed trajectories' summary as markdown (mean and std loss per checkpoint, where the PNG is)."""
    meta = read_meta(uri, TrajectoriesMeta)
    rows = "\n".join(f"| {int(s)} | {m:.4f} | {d:.4f} |"
                     for s, m, d in zip(meta.steps, meta.mean_loss, meta.std_loss))
    png = meta.summary_png
    png = f"\n\nTrajectory plot (PNG in the artifact store): `{png}`\n" if png else ""
    return (f"# S2L loss trajectories\n\nArtifact: `{uri}`\n\n"
            f"| checkpoint step | mean loss | std |\n|---|---|---|\n{rows}{png}")


def log_summary(run_id: str, uri: str) -> None:
    """Mean/std loss per checkpoint as MLflow metrics, the PNG and the markdown as artifacts."""
    meta = read_meta(uri, TrajectoriesMeta)
    for s, m, d in zip(meta.steps, meta.mean_loss, meta.std_loss):
        tracking.log_metrics(run_id, {"trajectory_mean_loss": m, "trajectory_std_loss": d}, int(s))
    if meta.summary_png:
        tracking.log_bytes(run_id, read_bytes(meta.summary_png), "trajectories.png", "s2l")
    tracking.log_bytes(run_id, summary_markdown(uri).encode(), "trajectories.md", "s2l")


# ---------------------------------------------------------------- readers
