#!/bin/bash
# The device run of benchmarks/bench_gpu.py on a frozen copy of the package (.gpu/snap), pydantic from .whl.
# Copied to .gpu/run.sh by benchmarks/prepare_gpu_run.sh; run there as: bash .gpu/run.sh (carry .gpu and .whl).
cd "$(dirname "$0")/.." || exit 3
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=$PWD/.gpu/snap:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
python3 -c "import torch, transformers, peft, inspect; print(torch.__version__, transformers.__version__, peft.__version__); from torch.nn.attention.varlen import varlen_attn; print(inspect.signature(varlen_attn))"
python3 .gpu/snap/benchmarks/bench_gpu.py --model-config .gpu/smollm2-135m-config --out "$OUT" "$@" 2>&1 | tee "$OUT/log.txt"
exit "${PIPESTATUS[0]}"
