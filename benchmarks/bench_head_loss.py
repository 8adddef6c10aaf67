"""The training loss on the loss rows only (`core/head_loss.py`) against the whole batch's logits, in the same run.

Each variant runs in a process of its own (so its peak RSS, `getrusage`'s ru_maxrss, is its own): the built-in
SmolLM2-135M-Instruct with LoRA as `finetune` prepares it at its defaults, batches of real text (Python's
reference documentation) at two prompt shares, forward and backward of `core.training.token_loss_sum` for a few
steps. `logits` is the path a model without a frozen head takes (the model's own logits, log-softmax over the
whole vocabulary); `loss_rows` the fused chunked one.
Repeats are interleaved and the fastest of each kept (on a shared machine the minimum is the least disturbed).

    python benchmarks/bench_head_loss.py            # batch 8 x 128, 3 steps, 2 repeats
    python benchmarks/bench_head_loss.py --quick    # 1 step, 1 repeat

Exits non-zero when the loss-rows path is slower than the logits path on any data (ratio below 1.0), when its
loss differs by more than 1e-4 relative, or when its peak RSS is not lower.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

RESULT = "RESULT "
# (name, the share of each row that is prompt: no loss there). Chat SFT rows are mostly response; a long-context
# task (a document, then a short answer) is mostly prompt, which is where the loss rows are few.
DATA = (("mostly-response", 0.2), ("mostly-prompt", 0.8))


def worker(variant: str, prompt_share: float, batch: int, length: int, steps: int) -> dict:
    import torch
    from pydoc_data.topics import topics
    from transformers import AutoModelForCausalLM

    from sftcurate.core import training
    from sftcurate.core.config import FinetuneConfig
    from sftcurate.core.finetune import prepare_model
    from sftcurate.infra.models import builtin_smollm2_folder, resolve_tokenizer

    torch.manual_seed(0)
    folder = builtin_smollm2_folder()
    tok = resolve_tokenizer(str(folder))
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    model = prepare_model(model, FinetuneConfig())
    model.train()
    text = " ".join(topics[k] for k in sorted(topics))
    ids = torch.tensor(tok(text[:200_000])["input_ids"][:batch * length]).view(batch, length)
    labels = ids.clone()
    labels[:, :int(prompt_share * length)] = -100
    attn = torch.ones_like(ids)
    if variant == "logits":
        training.loss_rows = lambda *a: None   # the path of a model whose head is not frozen
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    best, value = float("inf"), None
    for _ in range(steps):
        t0 = time.perf_counter()
        loss, n_tok = training.token_loss_sum(model, ids, attn, labels)
        loss.backward()
        best, value = min(best, time.perf_counter() - t0), float(loss) / n_tok
    return {"seconds": best, "loss": value, "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
            "before_gib": before / 2 ** 20}


def measure(variant: str, prompt_share: float, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, "--prompt-share", str(prompt_share), "--batch",
           str(args.batch), "--length", str(args.length), "--steps", str(args.steps)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith(RESULT))[len(RESULT):])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--worker", choices=["logits", "loss_rows"])
    ap.add_argument("--prompt-share", type=float, default=0.2)
    args = ap.parse_args()
    if args.worker:
        print(RESULT + json.dumps(worker(args.worker, args.prompt_share, args.batch, args.length, args.steps)))
        return 0
    if args.quick:
        args.steps, args.repeats = 1, 1
    failed = []
    print(f"SmolLM2-135M-Instruct + LoRA, batch {args.batch} x {args.length}, forward + backward of the loss, "
          f"fastest of {args.steps} steps x {args.repeats} repeats")
    print("| data | logits s/step | loss rows s/step | speed-up | loss (logits / rows) | peak RSS logits / rows |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, share in DATA:
        runs = {"logits": [], "loss_rows": []}
        for _ in range(args.repeats):
            for variant in runs:
                runs[variant].append(measure(variant, share, args))
        old, new = (min(runs[v], key=lambda r: r["seconds"]) for v in ("logits", "loss_rows"))
        ratio = old["seconds"] / new["seconds"]
        print(f"| {name} | {old['seconds']:.2f} | {new['seconds']:.2f} | {ratio:.2f}x | {old['loss']:.5f} / "
              f"{new['loss']:.5f} | {old['peak_gib']:.2f} / {new['peak_gib']:.2f} GiB |")
        if ratio < 1.0:
            failed.append(f"{name}: the loss-rows path is slower ({ratio:.2f}x)")
        if abs(old["loss"] - new["loss"]) > 1e-4 * abs(old["loss"]):
            failed.append(f"{name}: the losses differ ({old['loss']} vs {new['loss']})")
        if new["peak_gib"] >= old["peak_gib"]:
            failed.append(f"{name}: the loss-rows path's peak RSS is not lower")
    for line in failed:
        print("FAILED:", line)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
