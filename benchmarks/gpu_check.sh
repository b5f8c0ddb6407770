#!/usr/bin/env bash
# One-command GPU validation (`make gpu-check`), meant to finish in under 9 minutes on one H100/H200:
#   1. install: when the machine's python3 (GPU_CHECK_PYTHON) already has a CUDA torch, an editable
#      install into it without dependencies (GPU images ship torch, triton, pytest, hypothesis,
#      transformers; nothing is downloaded); otherwise `make install` (.venv seeing the system's
#      site-packages), falling back to an editable install without dependencies.
#      Wheels in .whl/ (`make gpu-wheels` on a machine with network: the peers Liger-Kernel and Cut
#      Cross-Entropy) are installed from there without an index, for machines that cannot download;
#   2. the test suite on CUDA tensors (STEERLM_TEST_DEVICE=cuda: Triton compiled, not interpreted);
#   3. `steerlm-kernels bench` on CUDA: the whole grid (logits in: N in {4096, 16384} x V in {32000,
#      128256, 256000}; fused linear: x H in {2304, 4096}; the group ops), the peers timed beside us
#      and checked for agreement, bandwidth and matmul rate measured in the same run; bench.md is
#      ready to paste into benchmarks/RESULTS.md, bench.json and the PNG plots beside it.
# Output folder: the first argument, else $OUT, else bench-out/. Logs of every step land there too.
# Exit status: 0 only when every step passed (a failing step does not stop the later ones).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT_DIR="${1:-${OUT:-bench-out}}"
mkdir -p "$OUT_DIR"
PY=.venv/bin/python
TEST_TIMEOUT="${GPU_CHECK_TEST_TIMEOUT:-200}"
BENCH_TIMEOUT="${GPU_CHECK_BENCH_TIMEOUT:-270}"
DEADLINE="${GPU_CHECK_DEADLINE:-530}"  # seconds for the whole check (a killed bench leaves bench.partial.json)
start=$(date +%s)
status=0
install_note=""
stamp() { echo "=== [$(( $(date +%s) - start ))s] $*"; }

stamp "1/3 install"
SYS_PY="${GPU_CHECK_PYTHON:-python3}"
if "$SYS_PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    # The machine's python already has a CUDA torch. Use it directly: on images where that python
    # is itself a virtual environment, a `--system-site-packages` .venv would see the BASE
    # interpreter's packages, not that torch, and `make install` would try to download one.
    PY="$SYS_PY"
    echo "using $("$PY" -c 'import sys, torch; print(sys.executable, "torch", torch.__version__)')" \
        | tee "$OUT_DIR/install.log"
    if ! "$PY" -m pip install --no-build-isolation --no-deps -e . 2>&1 | tee -a "$OUT_DIR/install.log"; then
        echo "editable install failed; building the extension in place instead" | tee -a "$OUT_DIR/install.log"
        "$PY" setup.py build_ext --inplace 2>&1 | tee -a "$OUT_DIR/install.log" || echo "WARNING: no extension"
        export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
        install_note=" (WARNING: editable install failed, used build_ext --inplace; see install.log)"
    fi
elif ! make install 2>&1 | tee "$OUT_DIR/install.log"; then
    echo "make install failed; falling back to an editable install without dependencies" | tee -a "$OUT_DIR/install.log"
    test -x "$PY" || python3 -m venv --system-site-packages .venv
    if ! "$PY" -m pip install --no-build-isolation --no-deps -e . 2>&1 | tee -a "$OUT_DIR/install.log"; then
        echo "install FAILED"; exit 1
    fi
    install_note=" (WARNING: make install failed, used the fallback install; see install.log)"
fi
if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps .whl/*.whl 2>&1 | tee -a "$OUT_DIR/install.log" \
        || echo "WARNING: installing .whl/*.whl failed (the peers will be reported as not installed)"
fi
"$PY" -m steerlm_kernels info 2>&1 | tee "$OUT_DIR/info.log"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA device visible to torch: this check needs a GPU"; exit 1
fi

# Keep the whole check under the deadline: the tests get what the benchmark does not need.
left=$(( DEADLINE - ($(date +%s) - start) - BENCH_TIMEOUT ))
[ "$left" -lt "$TEST_TIMEOUT" ] && TEST_TIMEOUT=$left
[ "$TEST_TIMEOUT" -lt 60 ] && TEST_TIMEOUT=60
stamp "2/3 test suite on CUDA (timeout ${TEST_TIMEOUT}s)"
if "$PY" -c "import pytest" 2>/dev/null; then
    STEERLM_TEST_DEVICE=cuda timeout "$TEST_TIMEOUT" "$PY" -m pytest -q --durations=10 tests 2>&1 \
        | tee "$OUT_DIR/tests.log"
    test_rc=${PIPESTATUS[0]}
else
    echo "pytest is not importable: tests not run" | tee "$OUT_DIR/tests.log"
    test_rc=1
fi
[ "$test_rc" -eq 0 ] || status=1

stamp "3/3 benchmark grid + peers (timeout ${BENCH_TIMEOUT}s)"
timeout "$BENCH_TIMEOUT" "$PY" -m steerlm_kernels bench --device cuda --dtype bf16 --output "$OUT_DIR" \
    --budget $(( BENCH_TIMEOUT - 40 )) 2>&1 \
    | tee "$OUT_DIR/bench.log"
bench_rc=${PIPESTATUS[0]}
[ "$bench_rc" -eq 0 ] || status=1

stamp "done: tests rc=$test_rc, bench rc=$bench_rc; results in $OUT_DIR/ (bench.md, bench.json, *.log)$install_note"
exit "$status"
