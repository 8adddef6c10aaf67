"""GPU rows (issue 26) in one short run sized for a borrowed GPU: every row against a baseline measured in the same
run, on the same device, with the same data.

1. peak: a bf16 8192^3 matrix product (the MFU denominator, measured here, not the datasheet's).
2. token features, SmolLM2-135M architecture: today's padded, length-grouped `embed_encoded` (8,192 tokens per
   batch, bf16) against the packed `embed_packed` (65,536 tokens per batch, flash variable-length attention), plus
   padded at 65,536 tokens to separate the batch size from packing; loss tokens/s, relative difference of the
   features, MFU. The same for a SmolLM2-1.7B-architecture model (random weights).
3. S2L trajectories (per-example losses): padded `example_losses` against `packed_example_losses`.
4. fine-tuning: today's loop (kept below as `legacy_train`: padded widths rounded to 64, foreach AdamW, the loss
   read back every step) against `core.training.train` (packed, fused AdamW, the loss read one step late), LoRA on
   the 135M architecture at the default batch of 16 examples and at 128; a profile of a few steps of each; full
   fine-tuning of the 1.7B architecture (MFU by 6 x parameters x tokens).
5. FisherSFT: `core.fisher_device.device_lazy_greedy` against the naive greedy and the CPU-style `lazy_greedy`,
   both on the device, N=20,000, L=32, d=256, K=200 (identical picks); then N=10^6, d=256, K=10,000.

Weights are random (seeded): throughput does not depend on their values, so no loss is reported. `--model-config`
is a folder with SmolLM2-135M-Instruct's config.json and tokenizer files (the 1.7B architecture is that config with
SmolLM2-1.7B's sizes). The text is the Python language reference (`pydoc_data`), as in the CPU benchmarks.

    python benchmarks/bench_gpu.py --model-config DIR --out DIR        # on a GPU, about 3 minutes
    python benchmarks/bench_gpu.py --model-config DIR --smoke          # tiny sizes, any device (tests run this)

Prints a markdown table last and writes it with the raw numbers (gpu.json) and the profiles to --out. Exits 1 when
a row fails or the device greedy's picks differ from the naive greedy's.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_fishersft import embedding_corpus  # noqa: E402

from sftcurate.core.embedding import embed_encoded, embed_packed  # noqa: E402
from sftcurate.core.fisher import LogDetObjective  # noqa: E402
from sftcurate.core.fisher_device import DeviceLogDet, device_lazy_greedy  # noqa: E402
from sftcurate.core.fisher_greedy import lazy_greedy, naive_greedy  # noqa: E402
from sftcurate.core.packing import packs  # noqa: E402
from sftcurate.core.tokenize import encode_pairs  # noqa: E402
from sftcurate.core.training import (Recipe, batch_schedule, batch_width, collate, token_loss_sum,  # noqa: E402
                                     train)
from sftcurate.core.trajectories import example_losses, packed_example_losses  # noqa: E402
from sftcurate.infra import progress  # noqa: E402

# SmolLM2-1.7B's sizes on the 135M config (same tokenizer and vocabulary; tied embeddings).
LARGE = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24, "num_attention_heads": 32,
         "num_key_value_heads": 32}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2}
FULL = {"peak_n": 8192, "embed": 4096, "embed_large": 2048, "traj": 4096, "ft_steps": 30, "ft_large_steps": 8,
        "ft_batches": (16, 128), "ft_large_batch": 64, "naive": (20000, 200), "large": (1000000, 10000), "arch": {},
        "arch_large": LARGE}
SMOKE = {"peak_n": 64, "embed": 12, "embed_large": 6, "traj": 12, "ft_steps": 2, "ft_large_steps": 1,
         "ft_batches": (2, 4), "ft_large_batch": 2, "naive": (120, 6), "large": (300, 10), "arch": TINY,
         "arch_large": TINY}
PADDED_TOKENS, PACKED_TOKENS = 8192, 65536


class Deadline(Exception):
    pass


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn):
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t


def peak_tflops(device: str, n: int) -> float:
    """Dense bf16 matrix-product rate on random data (mean of 10 after 3 warm-ups), TFLOP/s."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    _, s = timed(lambda: [a @ b for _ in range(10)])
    return 10 * 2 * n ** 3 / s / 1e12


def random_model(config_dir: Path, overrides: dict, device: str, seed: int = 0):
    """`config_dir`'s architecture with `overrides`, seeded random weights, bf16 on a GPU (float32 elsewhere)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(config_dir)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(seed)
    with torch.device(device):   # initialised where it runs: a 1.7B model is seconds on a GPU, minutes on a CPU
        model = AutoModelForCausalLM.from_config(cfg)
    return model.to(torch.bfloat16 if device == "cuda" else torch.float32).eval()


def param_counts(model) -> dict:
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel()
    return {"params": total, "body_params": total - embed}


def mfu(flops: float, seconds: float, peak: float) -> float:
    return flops / seconds / 1e12 / peak


# ---------------------------------------------------------------- rows

def features_row(model, enc: list, device: str, peak: float, with_padded_big: bool = True) -> dict:
    dev = torch.device(device)
    tokens = int(sum(len(e.input_ids) for e in enc))
    loss_tokens = int(sum(e.n_loss for e in enc))
    counts = param_counts(model)
    embed_encoded(model, enc[:64], PADDED_TOKENS, dev)           # warm-up: kernels and workspaces
    embed_packed(model, enc[:256], PACKED_TOKENS, dev)
    (old, _), t_old = timed(lambda: embed_encoded(model, enc, PADDED_TOKENS, dev))
    (new, _), t_new = timed(lambda: embed_packed(model, enc, PACKED_TOKENS, dev))
    _, t_new2 = timed(lambda: embed_packed(model, enc, PACKED_TOKENS, dev))
    row = {"examples": len(enc), "tokens": tokens, "loss_tokens": loss_tokens, **counts, "packed_kernel": packs(model),
           "padded_s": t_old, "packed_s": t_new, "packed_again_s": t_new2,
           "rel_diff": float(np.linalg.norm(new - old) / max(np.linalg.norm(old), 1e-30))}
    if with_padded_big:
        _, row["padded_big_s"] = timed(lambda: embed_encoded(model, enc, PACKED_TOKENS, dev))
    for key in ("padded_s", "packed_s", "packed_again_s", "padded_big_s"):
        if key in row:
            row[key.replace("_s", "_tok_s")] = loss_tokens / row[key]
            row[key.replace("_s", "_mfu")] = mfu(2 * counts["body_params"] * tokens, row[key], peak)
    print(f"  features {row}", flush=True)
    return row


def trajectory_row(model, enc: list, device: str) -> dict:
    example_losses(model, enc[:64], 16384, device)
    packed_example_losses(model, enc[:256], PACKED_TOKENS)
    old, t_old = timed(lambda: example_losses(model, enc, 16384, device))
    new, t_new = timed(lambda: packed_example_losses(model, enc, PACKED_TOKENS))
    row = {"examples": len(enc), "padded_s": t_old, "packed_s": t_new, "ratio": t_old / t_new,
           "max_abs_diff": float(np.abs(new - old).max()), "mean_loss": float(old.mean())}
    print(f"  trajectories {row}", flush=True)
    return row


def legacy_train(model, pad_id: int, encoded: list, recipe: Recipe) -> dict:
    """Today's training loop before this change, kept verbatim in substance as the in-run baseline: padded batches
    (widths rounded up to 64 on a GPU), foreach AdamW, the loss and the token counts read back at every step."""
    device = next(model.parameters()).device
    lengths = np.array([len(e.input_ids) for e in encoded], dtype=np.int64)
    schedule = batch_schedule(lengths, recipe.batch_size, recipe.steps, recipe.seed, recipe.batching,
                              recipe.megabatch)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.learning_rate, weight_decay=recipe.weight_decay)
    real, t0 = 0, time.perf_counter()
    model.train()
    for step in range(recipe.steps):
        for group in optimizer.param_groups:
            group["lr"] = recipe.lr(step)
        batch = [encoded[i] for i in schedule[step]]
        ids, attn, labels = (t.to(device) for t in collate(batch, pad_id, batch_width(batch, recipe, True)))
        loss_sum, n_tok = token_loss_sum(model, ids, attn, labels)
        loss = loss_sum / max(n_tok, 1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, recipe.max_grad_norm)
        optimizer.step()
        float(loss.detach())
        real += int(attn.sum())
    sync()
    model.eval()
    return {"real_tokens": real, "seconds": time.perf_counter() - t0}


def profile_steps(fn, out: Path | None, name: str) -> dict:
    """Host time vs device time of a few training steps (torch.profiler), the table saved to `out`."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        _, wall = timed(fn)
    ka = prof.key_averages()
    device_us = sum(getattr(e, "self_device_time_total", 0) or 0 for e in ka)
    if out:
        sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        (out / f"profile-{name}.txt").write_text(ka.table(sort_by=sort, row_limit=30))
    return {"wall_s": wall, "device_busy_s": device_us / 1e6, "ops": len(ka)}


def finetune_rows(model_fn, tokenizer, rows_text: list, sizes: dict, large_fn, peak: float, out: Path | None) -> dict:
    from sftcurate.core.config import FinetuneConfig
    from sftcurate.core.finetune import prepare_model, recipe as make_recipe

    enc = encode_pairs(tokenizer, rows_text, 256)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    result: dict = {"lora": []}
    steps, large_steps, (small_batch, big_batch) = sizes["ft_steps"], sizes["ft_large_steps"], sizes["ft_batches"]
    for batch in (small_batch, big_batch):
        cfg = FinetuneConfig(steps=steps, batch_size=batch, max_length=256, checkpoint_every=10**9, seed=0,
                             learning_rate=1e-4, dtype="bfloat16")
        rec = make_recipe(cfg, enc)
        for name in ("legacy", "new"):
            model = prepare_model(model_fn(), cfg)
            warm = replace(rec, steps=3)
            runner = (lambda r: legacy_train(model, pad_id, enc, r)) if name == "legacy" else \
                (lambda r: train(model, pad_id, enc, r))
            runner(warm)
            if batch == small_batch:
                result[f"profile_{name}"] = profile_steps(lambda: runner(replace(rec, steps=3)), out, name)
            stats, secs = timed(lambda: runner(rec))
            real = stats["real_tokens"] if isinstance(stats, dict) else stats.real_tokens
            result["lora"].append({"loop": name, "batch": batch, "steps": steps, "real_tokens": real, "seconds": secs,
                                   "tokens_per_s": real / secs, "step_ms": 1000 * secs / steps})
            print(f"  finetune {result['lora'][-1]}", flush=True)
            del model
    cfg = FinetuneConfig(steps=large_steps, batch_size=sizes["ft_large_batch"], max_length=256, checkpoint_every=10**9, seed=0,
                         learning_rate=1e-5, dtype="bfloat16", full=True)
    model = prepare_model(large_fn(), cfg)
    rec = make_recipe(cfg, enc)
    train(model, pad_id, enc, replace(rec, steps=2))
    stats, secs = timed(lambda: train(model, pad_id, enc, rec))
    counts = param_counts(model)
    result["full_large"] = {"batch": sizes["ft_large_batch"], "steps": large_steps, "real_tokens": stats.real_tokens, "seconds": secs,
                            "tokens_per_s": stats.real_tokens / secs, **counts,
                            "mfu": mfu(6 * counts["params"] * stats.real_tokens, secs, peak),
                            "mfu_body": mfu(6 * counts["body_params"] * stats.real_tokens, secs, peak),
                            "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available()
                            else None}
    print(f"  finetune large {result['full_large']}", flush=True)
    return result


def gpu_features(n: int, L: int, d_in: int, d_proj: int, device: str, seed: int = 3, chunk: int = 20000):
    """bench_fishersft's `hidden_like` distribution drawn on the device and projected to d_proj."""
    from sftcurate.core.embedding import random_projection

    g = torch.Generator(device=device).manual_seed(seed)
    p = torch.from_numpy(random_projection(d_in, d_proj)).to(device)
    spec = torch.arange(1, d_in + 1, device=device, dtype=torch.float32) ** -0.5
    out = torch.empty(n * L, d_proj, device=device)
    for lo in range(0, n, chunk):
        m = min(chunk, n - lo)
        s = torch.exp(0.5 * torch.randn(m, 1, 1, device=device, generator=g))
        mu = 0.5 * torch.randn(m, 1, d_in, device=device, generator=g)
        z = torch.randn(m, L, d_in, device=device, generator=g)
        out[lo * L:(lo + m) * L] = ((s * (mu + z) * spec).reshape(m * L, d_in)) @ p
    return out, np.arange(n + 1, dtype=np.int64) * L


def fisher_rows(n_naive: int, k_naive: int, n: int, k: int, device: str, deadline_s: float) -> dict:
    out = {}
    x, off = gpu_features(n_naive, 32, 576, 256, device)
    device_lazy_greedy(DeviceLogDet(x[:32 * 500], off[:501], 1.0, device=device), k=5)       # warm-up
    naive_greedy(LogDetObjective(x[:32 * 500], off[:501], 1.0, device=device, incremental=False), k=5)
    new, t_new = timed(lambda: device_lazy_greedy(DeviceLogDet(x, off, 1.0, device=device), k=k_naive))
    old, t_old = timed(lambda: lazy_greedy(LogDetObjective(x, off, 1.0, device=device), k=k_naive))
    naive, t_naive = timed(lambda: naive_greedy(LogDetObjective(x, off, 1.0, device=device, incremental=False),
                                                k=k_naive))
    out["naive"] = {"n": n_naive, "k": k_naive, "naive_s": t_naive, "old_lazy_s": t_old, "device_lazy_s": t_new,
                    "identical": new.picks == naive.picks, "old_identical": old.picks == naive.picks,
                    "device_lazy_evals": new.evaluations, "rounds": new.info["rounds"],
                    "naive_evals": naive.evaluations}
    print(f"  fisher naive vs lazy: {out['naive']}", flush=True)
    del x
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    (x, off), t_gen = timed(lambda: gpu_features(n, 32, 576, 256, device))
    large = {"n": n, "k": k, "generate_s": t_gen}
    obj, large["init_s"] = timed(lambda: DeviceLogDet(x, off, 1.0, device=device))
    start, marks = time.perf_counter(), {1, 10, 100, 1000, 5000, k}
    large["milestones"] = {}

    def listener(name, event, detail):   # a borrowed machine's minutes are few: stop at the deadline
        if name.startswith("greedy") and event == "step":
            large["picks"], large["seconds"] = detail["step"], time.perf_counter() - start
            if detail["step"] in marks:
                large["milestones"][detail["step"]] = round(large["seconds"], 2)
            if large["seconds"] > deadline_s:
                raise Deadline()

    unsubscribe = progress.subscribe(listener)
    try:
        res, secs = timed(lambda: device_lazy_greedy(obj, k=k))
        large.update(seconds=secs, picks=len(res.picks), evaluations=res.evaluations, rounds=res.info["rounds"],
                     finished=True)
    except Deadline:
        large.update(finished=False, evaluations=obj.n_evals, rounds=None)
    finally:
        unsubscribe()
    if device == "cuda":
        large["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    out["large"] = large
    print(f"  fisher large: {large}", flush=True)
    return out


# ---------------------------------------------------------------- report

def table(r: dict) -> list[str]:
    lines = [f"peak bf16 matmul: {r.get('peak_tflops', float('nan')):.0f} TFLOP/s", "",
             "| row | baseline (same run) | new | ratio | check |", "|---|---|---|---|---|"]
    for key, name in (("features", "token features, 135M"), ("features_large", "token features, 1.7B")):
        if key in r:
            f = r[key]
            lines.append(f"| {name} ({f['loss_tokens']:,} loss tokens) | padded 8k: {f['padded_tok_s']:,.0f} tok/s, "
                         f"MFU {f['padded_mfu']:.1%} | packed 64k: {f['packed_tok_s']:,.0f} tok/s (again "
                         f"{f['packed_again_tok_s']:,.0f}), MFU {f['packed_mfu']:.1%} | "
                         f"{f['padded_s'] / f['packed_s']:.1f}x | rel. diff {f['rel_diff']:.1e}; padded 64k "
                         f"{f.get('padded_big_tok_s', float('nan')):,.0f} tok/s |")
    if "traj" in r:
        t = r["traj"]
        lines.append(f"| S2L losses, 135M ({t['examples']} examples) | padded {t['padded_s']:.2f} s | packed "
                     f"{t['packed_s']:.2f} s | {t['ratio']:.1f}x | max abs diff {t['max_abs_diff']:.1e} |")
    ft = r.get("finetune", {})
    rows = {(x["loop"], x["batch"]): x for x in ft.get("lora", [])}
    small_batch, big_batch = r["sizes"]["ft_batches"]
    for batch in (small_batch, big_batch):
        if ("legacy", batch) in rows and ("new", batch) in rows:
            a, b = rows[("legacy", batch)], rows[("new", batch)]
            lines.append(f"| LoRA fine-tuning, 135M, batch {batch} | {a['tokens_per_s']:,.0f} tok/s, "
                         f"{a['step_ms']:.0f} ms/step | {b['tokens_per_s']:,.0f} tok/s, {b['step_ms']:.0f} ms/step | "
                         f"{b['tokens_per_s'] / a['tokens_per_s']:.1f}x | |")
    if ("legacy", small_batch) in rows and ("new", big_batch) in rows:
        lines.append(f"| LoRA, new at batch {big_batch} vs today at batch {small_batch} | | | "
                     f"{rows[('new', big_batch)]['tokens_per_s'] / rows[('legacy', small_batch)]['tokens_per_s']:.1f}x"
                     " | |")
    if "full_large" in ft:
        f = ft["full_large"]
        lines.append(f"| full fine-tuning, 1.7B, batch {f['batch']} | | {f['tokens_per_s']:,.0f} tok/s | | MFU {f['mfu']:.1%} "
                     f"(6 x all params), {f['mfu_body']:.1%} (non-embedding) |")
    for name in ("legacy", "new"):
        p = ft.get(f"profile_{name}")
        if p:
            lines.append(f"| profile, 3 steps, {name} | | wall {p['wall_s'] * 1000:.0f} ms, device busy "
                         f"{p['device_busy_s'] * 1000:.0f} ms | | |")
    if "fisher" in r:
        nv, lg = r["fisher"].get("naive"), r["fisher"].get("large")
        if nv:
            lines.append(f"| FisherSFT N={nv['n']:,}, d=256, K={nv['k']} | naive {nv['naive_s']:.2f} s; CPU-style "
                         f"lazy {nv['old_lazy_s']:.2f} s | device lazy {nv['device_lazy_s']:.3f} s | "
                         f"{nv['naive_s'] / nv['device_lazy_s']:.1f}x naive | identical {nv['identical']} |")
        if lg and "seconds" in lg:
            done = "" if lg.get("finished") else f" (deadline: {lg['picks']:,} picks)"
            lines.append(f"| FisherSFT N={lg['n']:,}, d=256, K={lg['k']:,} | 65.6 s (docs/GPU.md, 2026-11-30) | "
                         f"{lg['seconds']:.1f} s{done} | {65.6 / lg['seconds']:.1f}x | {lg['evaluations']:,} gains, "
                         f"milestones {lg['milestones']} |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-config", type=Path, required=True, help="folder: config.json and tokenizer files")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on any device: checks the code paths")
    ap.add_argument("--fisher-deadline", type=float, default=120.0, help="seconds for the N=10^6 greedy")
    ap.add_argument("--skip", default="", help="comma list: features,traj,finetune,fisher")
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    sizes = SMOKE if args.smoke else FULL
    skip = set(filter(None, args.skip.split(",")))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
                     "torch": torch.__version__, "sizes": {k: v for k, v in sizes.items() if "arch" not in k}}
    print(f"device {results['device']}, torch {torch.__version__}", flush=True)
    results["peak_tflops"] = peak_tflops(device, sizes["peak_n"])
    peak = results["peak_tflops"]
    tok = AutoTokenizer.from_pretrained(args.model_config)
    small = lambda: random_model(args.model_config, sizes["arch"], device)          # noqa: E731
    large = lambda: random_model(args.model_config, sizes["arch_large"], device)    # noqa: E731
    texts = embedding_corpus(max(sizes["embed"], sizes["traj"]))
    enc, results["encode_s"] = timed(lambda: encode_pairs(tok, texts, 256))

    steps = [("features", lambda: features_row(small(), enc[:sizes["embed"]], device, peak)),
             ("features_large", lambda: features_row(large(), enc[:sizes["embed_large"]], device, peak, False)),
             ("traj", lambda: trajectory_row(small(), enc[:sizes["traj"]], device)),
             ("finetune", lambda: finetune_rows(small, tok, texts[:1024], sizes, large, peak, args.out)),
             ("fisher", lambda: fisher_rows(*sizes["naive"], *sizes["large"], device, args.fisher_deadline))]
    ok = True
    for key, fn in steps:
        if key in skip or (key == "features_large" and "features" in skip):
            continue
        t = time.perf_counter()
        try:
            results[key] = fn()
        except Exception:  # one row failing must not lose the others' numbers on a borrowed machine
            ok = False
            results[key + "_error"] = traceback.format_exc()
            print(results[key + "_error"], flush=True)
        print(f"{key}: {time.perf_counter() - t:.1f} s", flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
        if args.out:
            (args.out / "gpu.json").write_text(json.dumps(results, indent=1, default=str))
    lines = table(results)
    print("\n".join(lines))
    if args.out:
        (args.out / "gpu.md").write_text("\n".join(lines) + "\n")
    if "fisher" in results:
        ok = ok and results["fisher"]["naive"]["identical"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
