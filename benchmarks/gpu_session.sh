#!/usr/bin/env bash
# The first thing to run on a GPU, in ONE call of the device tool (10-minute limit per call), from
# the repository root:
#
#     bash benchmarks/gpu_session.sh
#
# 1. installs fastadapt (no network: --no-deps into the image's torch / Triton / transformers / PEFT)
#    and builds the native extension (fastadapt._C, its CUDA kernels included) once, timed out on
#    its own so that a slow nvcc never eats the rest;
# 2. runs the test suite on the GPU (TRITON_INTERPRET unset: Triton compiles for the device);
# 3. runs `fastadapt bench --quick`, which verifies every op again here and times every case.
#
# Everything ends inside TOTAL seconds (default 570, 9.5 minutes): each step gets a `timeout` from
# what is left, and the bench gets a --budget 90 s shorter than its timeout, so that it stops
# starting new measurements and writes its reports (it rewrites them after every case anyway).
# What comes back, under $OUT (7 files, each capped at 15 MiB):
#     setup.log  pytest.log  bench.log  bench/{RESULTS.md, results.json, ratio_to_floor.png, lora_vs_m.png}
# The exit status is that of the first step that failed (124: a timeout), 0 if all passed.

set -u -o pipefail
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
OUT=${OUT:?set OUT to the folder whose files come back}
TOTAL=${TOTAL:-570}
START=$(date +%s)
mkdir -p "$OUT/bench"
status=0

left() { echo $((TOTAL - ($(date +%s) - START))); }

# Keeps a log under the device tool's 16 MiB per-file limit: its head and its tail.
cap() {
    local f=$1 max=$((15 * 1024 * 1024))
    if [ -f "$f" ] && [ "$(stat -c %s "$f")" -gt "$max" ]; then
        { head -c $((max / 2)); echo; echo "[... cut to fit 15 MiB ...]"; tail -c $((max / 2)) "$f"; } < "$f" > "$f.cut"
        mv "$f.cut" "$f"
    fi
}

step() {  # step NAME SECONDS LOG COMMAND...: run with a timeout, keep the first failure's status
    local name=$1 secs=$2 log=$3 rc start
    shift 3
    start=$(( $(cat "$log" 2>/dev/null | wc -l) + 1 ))
    echo "== $name (timeout ${secs}s, $(left)s left) =="
    timeout --kill-after=10 "$secs" "$@" >> "$log" 2>&1
    rc=$?
    tail -n +"$start" "$log" | tail -n 25  # this step's last lines, into the device tool's output
    cap "$log"
    echo "== $name: exit $rc after $(($(date +%s) - START))s in all =="
    if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc; fi
    return "$rc"
}

{ nvidia-smi; python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
    > "$OUT/setup.log" 2>&1
step "install" 90 "$OUT/setup.log" pip install --no-deps --no-build-isolation -e .

# A build killed half-way leaves a lock that later processes would wait on: after a failed build
# the rest runs without the native backends (they report why in `fastadapt info`).
if ! step "native extension build" 200 "$OUT/setup.log" \
        python -c "from fastadapt.backends import native_status; ok, why = native_status(); print(why); raise SystemExit(0 if ok else 1)"; then
    export FASTADAPT_NO_NATIVE=1
    echo "native extension unavailable: running without the cpp / cuda backends" | tee -a "$OUT/setup.log"
fi
step "fastadapt info" 60 "$OUT/setup.log" python -m fastadapt info

# The tests get what is left minus the bench's share (at least 280 s), at most 240 s.
secs=$(( $(left) - 280 )); [ "$secs" -gt 240 ] && secs=240
if [ "$secs" -ge 30 ]; then
    step "tests on the GPU" "$secs" "$OUT/pytest.log" python -m pytest -n 8 -q --tb=short -p no:cacheprovider
else
    echo "no time left for the tests" | tee "$OUT/pytest.log"
fi

secs=$(( $(left) - 5 ))
step "fastadapt bench --quick" "$secs" "$OUT/bench.log" \
    python -m fastadapt bench --quick --out "$OUT/bench" --budget $((secs - 90))
for f in "$OUT"/bench/*; do cap "$f"; done

echo "gpu_session.sh: exit $status after $(($(date +%s) - START))s"
exit "$status"
