"""Fine-tuning throughput: length-grouped batches against padding every batch to the maximum length.

Same data (Python language reference passages of varied length), same model, same recipe (steps, batch size,
learning rate, seed), in the same run; only `FinetuneConfig.batching` differs. Prints real (non-pad) tokens/s,
the padding share of each, and the speed-up. Also shows random batches padded to their own longest example.
Repeats are interleaved and the best of each is kept (on a shared machine the minimum is the least disturbed).

    python benchmarks/bench_finetune.py            # 40 steps, batch 16, max length 256, 3 repeats
    python benchmarks/bench_finetune.py --quick    # 6 steps, 1 repeat (CI)
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

MODES = ("length_grouped", "random", "pad_to_max")


def build_rows(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Real text without a download: passages of the Python language reference (pydoc_data).

    Response lengths are heavy-tailed like real SFT sets (log-normal: median ~35 words, a tail past 200): most
    examples are short, a few are long, which is where padding every batch to the maximum wastes compute."""
    from pydoc_data.topics import topics

    rng = np.random.default_rng(seed)
    words = [(k, " ".join(topics[k].split()).split(" ")) for k in sorted(topics)]
    out = []
    for i in range(n):
        name, text = words[i % len(words)]
        length = int(np.clip(rng.lognormal(3.5, 0.9), 4, 400))
        start = int(rng.integers(0, max(1, len(text) - length)))
        out.append((f"Explain `{name}` in Python.", " ".join(text[start:start + length])))
    return out


def run_once(spec: str, rows, mode: str, steps: int, batch_size: int, max_length: int) -> dict:
    import torch

    from sftcurate.infra.models import resolve_model
    from sftcurate.infra.models import default_device
    from sftcurate.core.finetune import FinetuneConfig, prepare_model, train
    from sftcurate.core.tokenize import encode_pairs

    cfg = FinetuneConfig(steps=steps, batch_size=batch_size, max_length=max_length, batching=mode,
                         checkpoint_every=10**9, seed=0, learning_rate=1e-3)
    loaded = resolve_model(spec, device=default_device())
    model = prepare_model(loaded.model, cfg)
    enc = encode_pairs(loaded.tokenizer, rows, max_length)
    if default_device().startswith("cuda"):
        torch.cuda.synchronize()
    stats = train(model, loaded.tokenizer, enc, cfg)
    return {"tokens_per_s": stats.tokens_per_s, "padding": stats.padding_fraction, "seconds": stats.seconds,
            "final_loss": float(np.mean(stats.losses[-3:])), "real_tokens": stats.real_tokens}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", default="tiny-gpt2:n_layer=4,n_embd=256,n_head=4,vocab=512")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--examples", type=int, default=512)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args(argv)
    steps = args.steps or (6 if args.quick else 40)
    repeats = args.repeats or (1 if args.quick else 3)

    import sftcurate.infra  # noqa: F401
    import torch

    from sftcurate.infra.models import default_device

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = build_rows(args.examples)
    print(f"model {args.model}, device {default_device()}, torch threads {torch.get_num_threads()}, "
          f"{args.examples} examples, {steps} steps x batch {args.batch_size}, max length {args.max_length}")
    run_once(args.model, rows, "length_grouped", 2, args.batch_size, args.max_length)  # warm-up
    best: dict[str, dict] = {}
    for _ in range(repeats):
        for mode in MODES:
            r = run_once(args.model, rows, mode, steps, args.batch_size, args.max_length)
            if mode not in best or r["tokens_per_s"] > best[mode]["tokens_per_s"]:
                best[mode] = r
    print(f"{'batching':<16}{'real tokens/s':>15}{'padding':>10}{'seconds':>10}{'final loss':>12}")
    for mode in MODES:
        r = best[mode]
        print(f"{mode:<16}{r['tokens_per_s']:>15,.0f}{r['padding']:>10.1%}{r['seconds']:>10.2f}"
              f"{r['final_loss']:>12.3f}")
    ratio = best["length_grouped"]["tokens_per_s"] / best["pad_to_max"]["tokens_per_s"]
    ratio_random = best["length_grouped"]["tokens_per_s"] / best["random"]["tokens_per_s"]
    expected = (1 - best["length_grouped"]["padding"]) / (1 - best["pad_to_max"]["padding"])
    print(f"speed-up length_grouped / pad_to_max: {ratio:.2f}x  (vs random batches padded to longest: "
          f"{ratio_random:.2f}x; compute-bound expectation from the padding shares: {expected:.2f}x)")
    return 0 if ratio > 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
