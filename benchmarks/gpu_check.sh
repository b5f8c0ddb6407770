#!/usr/bin/env bash
# One-command GPU validation on one H100/H200, with no network:
#   make gpu-check              # = bash benchmarks/gpu_check.sh [OUT_DIR]           full, <= 9 minutes
#   make gpu-check QUICK=1      # = bash benchmarks/gpu_check.sh --quick [OUT_DIR]   quick, <= 4 minutes
#   make gpu-check APP=1        # = bash benchmarks/gpu_check.sh --app [OUT_DIR]     application, <= 9 minutes
# Steps (a failing step does not stop the later ones):
#   1. install: into the machine's own python (GPU_CHECK_PYTHON, else python3, else .venv/bin/python:
#      the first whose torch sees a GPU; GPU images ship torch 2.11 + triton 3.6 there, and a venv
#      would hide them), `pip install --no-build-isolation --no-deps -e .` (builds steerlm_kernels._C
#      with the CUDA kernels of csrc/*.cu when nvcc is present; nothing is downloaded; if that fails,
#      `setup.py build_ext --inplace`), then the peers' wheels from .whl/ (`make gpu-wheels` on a
#      machine with network) without an index;
#   2. tests on CUDA tensors (STEERLM_TEST_DEVICE=cuda: Triton compiled, not interpreted; every
#      backend that runs on CUDA, the hand-written `cuda` one included). quick: the core ops
#      (contract of every backend's kernels, token/sequence NLL dense and packed, weighted loss,
#      in place, the group ops, tests/test_kernels_cuda.py); full: the whole suite; app: the
#      SteerLM 2.0 wrapper on the fused path in bf16 against fp32 (tests/test_steerlm2_trainer_fused.py
#      -k "bf16 or from_hf or wrapper");
#   3. `steerlm-kernels bench --device cuda`: quick: the main shape of the kernel sections (ce,
#      linear, group, dist, peers, score; no torch.compile comparators, whose compiles take
#      minutes); full: their grid with the peers, `--budget` inside its timeout; app: the
#      application sections at their GPU sizes (train: one SteerLM 2.0 step of a 1-layer Llama,
#      V=128256, H=4096, bf16, mbs 1-8; dropin: the HF Trainer step and the loss op against the
#      peers), which take minutes of their own (a process per row), hence their own mode;
#   4. the summary table (python -m steerlm_kernels.bench.summary): each step passed/failed with
#      its time, each section's headline ratio read from bench.json.
# Output folder: the argument, else $OUT, else bench-out/ (logs of every step, steps.tsv, bench.md,
# bench.json, plots). Exit status: 0 only when every step passed.
set -uo pipefail
cd "$(dirname "$0")/.."

MODE=full
OUT_ARG=""
for arg in "$@"; do
    case "$arg" in
        --quick) MODE=quick ;;
        --full) MODE=full ;;
        --app) MODE=app ;;
        -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
        -*) echo "gpu_check.sh: unknown option $arg (use --quick, --full, --app or an output folder)" >&2; exit 2 ;;
        *) OUT_ARG="$arg" ;;
    esac
done
case "${QUICK:-0}" in ""|0|no|false) ;; *) MODE=quick ;; esac
case "${APP:-0}" in ""|0|no|false) ;; *) MODE=app ;; esac
KERNEL_SECTIONS=ce,linear,group,dist,peers,score  # the application's sections (train, dropin): --app

OUT_DIR="${OUT_ARG:-${OUT:-bench-out}}"
mkdir -p "$OUT_DIR"
STEPS="$OUT_DIR/steps.tsv"
: > "$STEPS"
if [ "$MODE" = quick ]; then
    DEADLINE="${GPU_CHECK_DEADLINE:-230}"  # seconds for the whole check
    TEST_TIMEOUT="${GPU_CHECK_TEST_TIMEOUT:-75}"
    BENCH_TIMEOUT="${GPU_CHECK_BENCH_TIMEOUT:-100}"
    BENCH_MARGIN=35  # seconds of the bench's timeout left after its --budget (cases in flight, tables)
    TESTS=(tests/test_ops_cross_entropy.py tests/test_kernels_cuda.py tests/test_ops_group.py
           tests/test_api.py -k "not property and not hypothesis")
    BENCH_ARGS=(--sections "$KERNEL_SECTIONS" --grid main --repeats 3 --warmup 1 --no-plots
                --impls eager,liger,cce,matmuls,torch,triton,cuda,triton-tiles)
elif [ "$MODE" = app ]; then
    DEADLINE="${GPU_CHECK_DEADLINE:-530}"
    TEST_TIMEOUT="${GPU_CHECK_TEST_TIMEOUT:-90}"
    BENCH_TIMEOUT="${GPU_CHECK_BENCH_TIMEOUT:-420}"
    BENCH_MARGIN=120  # no row starts past the budget; one in flight gets >= 30 s, then the float64 reference, tables
    TESTS=(tests/test_steerlm2_trainer_fused.py -k "bf16 or from_hf or wrapper")
    BENCH_ARGS=(--sections train,dropin --no-plots)
else
    DEADLINE="${GPU_CHECK_DEADLINE:-530}"
    TEST_TIMEOUT="${GPU_CHECK_TEST_TIMEOUT:-200}"
    BENCH_TIMEOUT="${GPU_CHECK_BENCH_TIMEOUT:-270}"
    BENCH_MARGIN=40
    TESTS=(tests)
    BENCH_ARGS=(--sections "$KERNEL_SECTIONS")
fi
start=$(date +%s)
status=0
now() { echo $(( $(date +%s) - start )); }
stamp() { echo "=== [$(now)s] $*"; }
# record NAME RC SECONDS [NOTE]: one line of steps.tsv (read by the summary)
record() {
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${4:-}" >> "$STEPS"
    [ "$2" -eq 0 ] || status=1
}
summary() {  # by path: the summary needs only the standard library (works even without torch)
    "${PY:-python3}" steerlm_kernels/bench/summary.py "$OUT_DIR/bench.json" --steps "$STEPS" 2>&1 \
        | tee "$OUT_DIR/summary.txt"
}

stamp "1/3 install ($MODE check, output in $OUT_DIR/)"
t0=$(date +%s)
PY=""
for cand in "${GPU_CHECK_PYTHON:-}" python3 .venv/bin/python; do
    [ -n "$cand" ] || continue
    if "$cand" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        PY="$cand"; break
    fi
done
if [ -z "$PY" ]; then
    echo "no python here has a torch that sees a CUDA device (tried \$GPU_CHECK_PYTHON, python3, .venv/bin/python):" \
        "this check needs a GPU" | tee "$OUT_DIR/install.log"
    record install 1 $(( $(date +%s) - t0 )) "no CUDA torch"
    PY=python3 summary
    exit 1
fi
echo "using $("$PY" -c 'import sys, torch, triton; print(sys.executable, "torch", torch.__version__, "triton", triton.__version__)' 2>&1)" \
    | tee "$OUT_DIR/install.log"
install_rc=0
install_note=""
# A second run skips the build when this checkout is installed and its extension is newer than csrc/.
so=$("$PY" -c "import os, steerlm_kernels as p, steerlm_kernels._C as c
print(c.__file__ if os.path.dirname(p.__file__).startswith(os.getcwd()) else '')" 2>/dev/null)
if [ -n "$so" ] && [ -z "$(find csrc setup.py -newer "$so" -type f 2>/dev/null)" ]; then
    echo "already installed from this checkout, extension up to date: $so" | tee -a "$OUT_DIR/install.log"
    install_note="already installed; "
elif ! "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . 2>&1 | tee -a "$OUT_DIR/install.log"; then
    echo "editable install failed; building the extension in place instead" | tee -a "$OUT_DIR/install.log"
    if "$PY" setup.py build_ext --inplace 2>&1 | tee -a "$OUT_DIR/install.log"; then
        install_note="editable install failed, used build_ext --inplace; "
    else
        install_rc=1
        install_note="no extension built; "
    fi
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps .whl/*.whl 2>&1 | tee -a "$OUT_DIR/install.log" \
        || echo "WARNING: installing .whl/*.whl failed (the peers will be reported as not installed)"
fi
"$PY" -m steerlm_kernels info 2>&1 | tee "$OUT_DIR/info.log"
cuda_backend=$("$PY" -c "import steerlm_kernels as sk; print(sk.backends()['cuda'])" 2>&1 | tail -n 1)
echo "$cuda_backend"
record install "$install_rc" $(( $(date +%s) - t0 )) "${install_note}${cuda_backend}"

# The tests get what the benchmark does not need of the deadline.
left=$(( DEADLINE - $(now) - BENCH_TIMEOUT - 10 ))
[ "$left" -lt "$TEST_TIMEOUT" ] && TEST_TIMEOUT=$left
[ "$TEST_TIMEOUT" -lt 45 ] && TEST_TIMEOUT=45
stamp "2/3 tests on CUDA (${TESTS[*]}; timeout ${TEST_TIMEOUT}s)"
t0=$(date +%s)
if "$PY" -c "import pytest" 2>/dev/null; then
    # where nvcc built the CUDA kernels, a cuda backend that cannot run is a failure, not a skip
    require_cuda=""
    command -v nvcc >/dev/null 2>&1 && require_cuda=1
    STEERLM_TEST_DEVICE=cuda STEERLM_TEST_REQUIRE_CUDA_EXT="$require_cuda" timeout "$TEST_TIMEOUT" \
        "$PY" -m pytest -q -p no:cacheprovider --durations=10 "${TESTS[@]}" 2>&1 | tee "$OUT_DIR/tests.log"
    test_rc=${PIPESTATUS[0]}
    note=$(grep -E "^(=+ )?[0-9]+ (passed|failed)|^(=+ )?[0-9]+ failed" "$OUT_DIR/tests.log" | tail -n 1 | tr -d '=')
    [ "$test_rc" -eq 124 ] && note="timed out after ${TEST_TIMEOUT}s; $note"
else
    echo "pytest is not importable: tests not run" | tee "$OUT_DIR/tests.log"
    test_rc=1
    note="pytest not importable"
fi
record "tests on CUDA ($MODE)" "$test_rc" $(( $(date +%s) - t0 )) "$(echo "$note" | xargs)"

left=$(( DEADLINE - $(now) - 15 ))
[ "$left" -lt "$BENCH_TIMEOUT" ] && BENCH_TIMEOUT=$left
[ "$BENCH_TIMEOUT" -lt 60 ] && BENCH_TIMEOUT=60
stamp "3/3 benchmark ($MODE; timeout ${BENCH_TIMEOUT}s)"
t0=$(date +%s)
rm -f "$OUT_DIR/bench.json" "$OUT_DIR/bench.partial.json"
timeout "$BENCH_TIMEOUT" "$PY" -m steerlm_kernels bench --device cuda --dtype bf16 --output "$OUT_DIR" \
    --budget $(( BENCH_TIMEOUT - BENCH_MARGIN )) "${BENCH_ARGS[@]}" 2>&1 \
    | tee "$OUT_DIR/bench.log"
bench_rc=${PIPESTATUS[0]}
note=""
[ "$bench_rc" -eq 124 ] && note="timed out after ${BENCH_TIMEOUT}s (bench.partial.json holds the rows)"
record "bench ($MODE)" "$bench_rc" $(( $(date +%s) - t0 )) "$note"

stamp "done in $(now)s; results in $OUT_DIR/ (summary.txt, bench.md, bench.json, *.log)"
summary
exit "$status"
