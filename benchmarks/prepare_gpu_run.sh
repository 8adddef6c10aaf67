#!/bin/bash
# Prepares the device run of benchmarks/bench_gpu.py (docs/GPU.md): .gpu/ holds the built-in model's config and
# tokenizer, a frozen copy of the package and the run script; .whl/ the pydantic wheels the device image lacks.
# Both are ignored and travel with the device tool's `carry`. Then, on the device: bash .gpu/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
mkdir -p .git/info
for p in /.gpu/ /.whl/; do grep -qxF "$p" .git/info/exclude 2>/dev/null || echo "$p" >> .git/info/exclude; done
folder=$($PY -c "from sftcurate.infra.models import builtin_smollm2_folder; print(builtin_smollm2_folder())" | tail -1)
mkdir -p .gpu/smollm2-135m-config
for f in chat_template.jinja config.json generation_config.json tokenizer.json tokenizer_config.json; do
  cp "$folder/$f" .gpu/smollm2-135m-config/
done
rm -rf .gpu/snap && mkdir -p .gpu/snap/sftcurate
cp sftcurate/*.py .gpu/snap/sftcurate/
for d in data_contracts infra core tasks flows; do cp -r "$d" .gpu/snap/sftcurate/"$d"; done
cp -r benchmarks .gpu/snap/benchmarks
find .gpu/snap -name __pycache__ -prune -exec rm -rf {} +
cp benchmarks/gpu_run.sh .gpu/run.sh
rm -rf .whl
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
du -sh .gpu .whl
