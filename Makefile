# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv (seeing the system's site-packages, so an existing CUDA torch is kept),
# install torch==2.13.0 only when no torch is importable, then this package in editable mode
# without build isolation (an isolated build would download the multi-GB CUDA torch).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test lint bench gpu-check gpu-wheels clean test-gpu-stack

# The GPU machines' stack (Python 3.12, torch 2.11, triton 3.6; the oldest versions pyproject
# allows), in a second venv, CPU only: `make test-gpu-stack` (CI runs it after `make test`).
# torch 2.11 has no CPU wheel in the registry: the CUDA wheel comes (~4.9 GB, ~1.5 min), and imports
# fine without a GPU. numpy < 2.4: triton 3.6's interpreter converts 1-element arrays to Python
# ints (tensor.__index__), which numpy >= 2.4 refuses; triton 3.9's interpreter does not.
GPU_STACK_VENV ?= .venv-gpu-stack
GPU_STACK_PY := $(GPU_STACK_VENV)/bin/python
GPU_STACK_STAMP := $(GPU_STACK_VENV)/.installed-stamp
GPU_STACK_PYTHON ?= $(shell for p in python3.12 $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) python3; do $$p -c "" 2>/dev/null && { echo $$p; break; }; done)
GPU_STACK_PINS := "torch==2.11.0" "triton==3.6.0" "numpy<2.4"
# what runs there: the kernels through the interpreter, their AOT compile, cpp, the API, the registry
# and torch.compile, and the cuda backend's CPU-side tests with the compile of csrc/cuda_bindings.cpp
# against this CUDA torch's headers (the whole suite runs on the default stack)
GPU_STACK_TESTS ?= tests/test_ops_cross_entropy.py tests/test_ops_group.py tests/test_kernels_aot.py \
	tests/test_kernels_cpp.py tests/test_kernels_cuda.py tests/test_api.py tests/test_registry.py \
	tests/test_compile.py

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	# --no-build-isolation uses this venv's setuptools: Python 3.11's has no bdist_wheel without wheel
	$(PY) -m pip install "setuptools>=70.1" wheel ninja
	$(PY) -m pip install --no-build-isolation -e ".[test,plot,app]"
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

$(GPU_STACK_STAMP): pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(GPU_STACK_PY) || $(GPU_STACK_PYTHON) -m venv $(GPU_STACK_VENV)
	$(GPU_STACK_PY) -m pip install $(GPU_STACK_PINS) "setuptools>=70.1" wheel ninja
	# CPU kernels only: nvcc's compile of csrc/*.cu is checked on the default stack
	STEERLM_KERNELS_NO_CUDA=1 $(GPU_STACK_PY) -m pip install --no-build-isolation -e ".[test,app]" $(GPU_STACK_PINS)
	touch $(GPU_STACK_STAMP)

# The whole subset runs there, the AOT spill checks included (test_no_spills_at_default_blocks,
# test_every_kernel_dtype_arch_compiles): the default blocks compile without spills on triton 3.6
# as on 3.9 (the fp32 fused-linear tiles run 4 warps for that: kernels/linear_tiles.py).
test-gpu-stack: $(GPU_STACK_STAMP)
	$(GPU_STACK_PY) -m pytest -q $(GPU_STACK_TESTS)

clean:
	rm -rf $(VENV) $(GPU_STACK_VENV) build *.egg-info steerlm_kernels/*.so .pytest_cache .ruff_cache

# On an H100/H200 with python3's torch + triton (no network): `make gpu-check` (full, <= 9 min) or
# `make gpu-check QUICK=1` (<= 4 min), `make gpu-check APP=1` (the train / dropin sections, <= 9 min);
# OUT=DIR for the results (default bench-out/).
gpu-check:
	bash benchmarks/gpu_check.sh $(if $(filter-out 0,$(QUICK)),--quick)$(if $(filter-out 0,$(APP)),--app)

# Wheels of the peers for a GPU machine that cannot download (gpu_check.sh installs .whl/*.whl).
gpu-wheels:
	mkdir -p .whl
	$(PYTHON) -m pip download --no-deps -d .whl "liger-kernel==0.8.5" "cut-cross-entropy==25.1.1"
