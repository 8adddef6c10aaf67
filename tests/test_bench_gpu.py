"""The GPU benchmark's dry run: every row of benchmarks/bench_gpu.py at tiny sizes on the CPU, so device minutes go
to measuring, not to finding a typo."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from transformers import LlamaConfig

from sftcurate.infra.models import resolve_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_gpu  # noqa: E402


def test_bench_gpu_smoke_runs_every_row(tmp_path):
    folder = tmp_path / "arch"
    tokenizer = resolve_model("tiny-gpt2").tokenizer
    tokenizer.save_pretrained(folder)
    LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=4, num_key_value_heads=2).save_pretrained(folder)
    out = tmp_path / "out"
    assert bench_gpu.main(["--model-config", str(folder), "--smoke", "--out", str(out)]) == 0
    results = json.loads((out / "gpu.json").read_text())
    assert not [k for k in results if k.endswith("_error")]
    assert results["features"]["rel_diff"] < 1e-4                  # packed == padded in float32
    assert results["traj"]["max_abs_diff"] < 1e-4
    assert results["fisher"]["naive"]["identical"] and results["fisher"]["naive"]["old_identical"]
    assert {(r["loop"], r["batch"]) for r in results["finetune"]["lora"]} == {
        (loop, b) for loop in ("legacy", "new") for b in bench_gpu.SMOKE["ft_batches"]}
    assert (out / "profile-new.txt").exists() and "FisherSFT" in (out / "gpu.md").read_text()
