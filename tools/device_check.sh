#!/usr/bin/env bash
# The checks that need a CUDA device, as one script (a lent GPU's time is short: one call runs all).
#
#     OUT=results/device bash tools/device_check.sh [time-scale]
#
# 1. tests/test_device.py on the first CUDA device (training step against the float64 formula,
#    fp16/bf16 autocast and half-precision models, data init, eval cache, fold, export, state dicts);
# 2. tools/bench.py --device cuda (every workload that computes on a device), its table in
#    $OUT/bench/bench.md and raw numbers in $OUT/bench/bench.json;
# 3. tools/profile_step.py on workload $PROFILE_WORKLOAD (default 4): where each variant's step spends its time;
# 4. tools/mend_cost.py: what the zero-direction mend costs, against torch's fused kernel alone;
# 5. the CPU test suite under this machine's own torch (a version check: another torch than
#    requirements-dev.txt pins), spread over the cores, if pytest-xdist is there; not the
#    third-party zoo (its expectations are the pinned transformers').
# Each step runs under its own time limit and the next runs whatever the last gave; the exit
# status is the first step's that failed.  Runs from the repository root, with or without an install.
set -u
OUT=${OUT:-results/device}
SCALE=${1:-0.3}
PY=${PYTHON:-python3}
mkdir -p "$OUT/bench"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
step() {  # step NAME SECONDS COMMAND...: run under a time limit, log to $OUT/NAME.log, keep the first failure
    local name=$1 limit=$2 rc
    shift 2
    echo "== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    tail -n 25 "$OUT/$name.log"
    echo "== $name: exit $rc after $((SECONDS - start))s"
    [ "$status" -ne 0 ] || status=$rc
}

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,memory.used --format=csv
$PY -c 'import torch, onnxruntime; print("torch", torch.__version__, "cuda", torch.version.cuda,
torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device", "onnxruntime", onnxruntime.__version__)'
step test_device 120 $PY -m pytest -q -p no:cacheprovider tests/test_device.py
step bench 330 $PY tools/bench.py --device cuda --time-scale "$SCALE" --no-plots --out "$OUT/bench"
step profile 90 $PY tools/profile_step.py --device cuda --workload "${PROFILE_WORKLOAD:-4}" --rows 15
step mend_cost 120 $PY tools/mend_cost.py --device cuda --budget 8
if $PY -c 'import xdist' 2>/dev/null; then
    # -rf: the failures' one-line reasons at the end; not the third-party zoo, whose expectations are
    # those of the pinned transformers (another version builds other models)
    step cpu_suite "${SUITE_LIMIT:-240}" $PY -m pytest -q -rf -p no:cacheprovider --maxfail=30 -n "$(( $(nproc) > 2 ? $(nproc) - 2 : 1 ))" \
        --ignore=tests/test_device.py -m "not third_party"
fi
exit "$status"
