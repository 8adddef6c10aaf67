"""Sizing: what each stage costs per million tokens on this machine (CPU, or one GPU where there is one).

    python benchmarks/bench_sizing.py [--quick] [--models tiny-gpt2,builtin:smollm2-135m-instruct] [--json OUT]

Stages measured on real text (Python's language reference, the demo data):
- ingest: read + dedupe + tokenize + count loss tokens (tokenizer only, no model)
- forward features: one forward pass with hidden states (FisherSFT token features; S2L trajectories
  are one such pass per checkpoint per example)
- train step: forward + backward + AdamW (S2L proxy training, target fine-tuning), padded tokens
Prints seconds per million tokens and tokens/s; selection itself (greedy log-det) is reported by
benchmarks/bench_fishersft.py and is independent of the model.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sftcurate.infra  # noqa: E402,F401  (environment defaults)


def pool_pairs(limit: int | None) -> list[tuple[str, str]]:
    from sftcurate.core.config import SourceConfig
    from sftcurate.core.ingest import build_examples
    from sftcurate.infra.models import resolve_tokenizer

    table, _ = build_examples(SourceConfig(uri="builtin:python-docs", limit=limit), resolve_tokenizer("tiny-gpt2"), 256)
    return list(zip(table.column("prompt").to_pylist(), table.column("response").to_pylist()))


def bench_ingest(spec: str, limit: int | None) -> dict:
    from sftcurate.core.config import SourceConfig
    from sftcurate.core.ingest import build_examples
    from sftcurate.infra.models import resolve_tokenizer

    tok = resolve_tokenizer(spec)
    t0 = time.perf_counter()
    table, _ = build_examples(SourceConfig(uri="builtin:python-docs", limit=limit), tok, 1 << 20)
    seconds = time.perf_counter() - t0
    tokens = int(sum(table.column("prompt_tokens").to_pylist()) + sum(table.column("response_tokens").to_pylist()))
    return {"stage": "ingest (tokenize)", "model": spec, "tokens": tokens, "seconds": seconds}


def bench_forward(spec: str, pairs, max_length: int, batch_tokens: int) -> dict:
    from sftcurate.infra.models import resolve_model
    from sftcurate.core.embedding import embed_examples
    from sftcurate.core.tokenize import encode_pairs

    loaded = resolve_model(spec)
    processed = sum(len(e.input_ids) for e in encode_pairs(loaded.tokenizer, pairs, max_length))
    next(embed_examples(loaded.model, loaded.tokenizer, pairs[:4], max_length, batch_tokens))  # warm-up
    t0 = time.perf_counter()
    feats, offsets = next(embed_examples(loaded.model, loaded.tokenizer, pairs, max_length, batch_tokens,
                                         shard_size=len(pairs)))
    seconds = time.perf_counter() - t0
    return {"stage": "forward features", "model": spec, "tokens": int(processed), "seconds": seconds,
            "note": f"{len(pairs)} examples, max_length {max_length}, {int(offsets[-1])} of the tokens are loss tokens"}


def bench_train(spec: str, batch: int, seq: int, steps: int) -> dict:
    import torch

    from sftcurate.infra.models import resolve_model

    loaded = resolve_model(spec)
    model = loaded.model
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)

    def step():
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up (allocations)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - t0
    return {"stage": "train step (AdamW)", "model": spec, "tokens": batch * seq * steps, "seconds": seconds,
            "note": f"{steps} steps of {batch}x{seq} tokens"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer examples and steps (~2 min on 2 CPU cores)")
    parser.add_argument("--models", default="tiny-gpt2,builtin:smollm2-135m-instruct")
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args()
    import torch

    models = [m for m in args.models.split(",") if m]
    n_forward = {"tiny-gpt2": 400 if args.quick else 1000}
    rows = [bench_ingest("tiny-gpt2", None)]
    pairs = pool_pairs(None)
    for spec in models:
        n = n_forward.get(spec, 48 if args.quick else 160)
        rows.append(bench_forward(spec, pairs[:n], 256, 4096))
        big = spec != "tiny-gpt2"
        rows.append(bench_train(spec, 4, 256, (2 if args.quick else 4) if big else (10 if args.quick else 40)))
    device = "cuda:" + torch.cuda.get_device_name(0) if torch.cuda.is_available() else \
        f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()})"
    print(f"device: {device}\n")
    print("| stage | model | tokens | seconds | tokens/s | seconds per 1M tokens |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        r["tokens_per_s"] = r["tokens"] / r["seconds"]
        r["seconds_per_million"] = 1e6 / r["tokens_per_s"]
        r["device"] = device
        print(f"| {r['stage']} | {r['model']} | {r['tokens']:,} | {r['seconds']:.1f} | {r['tokens_per_s']:,.0f} | "
              f"{r['seconds_per_million']:,.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
