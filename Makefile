# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv (seeing the system's site-packages, so an existing CUDA torch is kept),
# install torch==2.13.0 only when no torch is importable, then this package in editable mode
# without build isolation (an isolated build would download the multi-GB CUDA torch).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test lint bench gpu-check gpu-wheels clean

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install --no-build-isolation -e ".[test,plot]"
	# megatron-core, only for the parity test of sk.megatron (runs on CPU with gloo; optional)
	$(PY) -m pip install --no-deps "megatron-core>=0.9" || echo "megatron-core not installed: its parity test will skip"
	# the peers (Liger-Kernel, Cut Cross-Entropy) for the agreement checks and benchmarks (optional; never touches torch/triton)
	$(PY) -m pip install --no-deps "liger-kernel==0.8.5" "cut-cross-entropy==25.1.1" || echo "peers not installed: their agreement checks will skip"
	touch $(STAMP)

install: $(STAMP)

# info + the fused loss beside eager PyTorch, then the main job: SteerLM 2.0 training on the
# embedded default (bundled sample data, tiny model, CPU, about a minute).
demo: $(STAMP)
	$(PY) -m steerlm_kernels demo
	$(PY) -m steerlm_kernels train

lint: $(STAMP)
	$(PY) -m ruff check steerlm_kernels tests benchmarks python

test: $(STAMP) lint
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) -m steerlm_kernels bench

clean:
	rm -rf $(VENV) build *.egg-info steerlm_kernels/*.so .pytest_cache .ruff_cache

gpu-check:
	bash benchmarks/gpu_check.sh

# Wheels of the peers for a GPU machine that cannot download (gpu_check.sh installs .whl/*.whl).
gpu-wheels:
	mkdir -p .whl
	$(PYTHON) -m pip download --no-deps -d .whl "liger-kernel==0.8.5" "cut-cross-entropy==25.1.1"
