#!/usr/bin/env bash
# The GPU figures of the speed benchmark in one call of a lent GPU machine, under that machine's own torch
# and timm (nothing installed). SECTIONS picks what runs, in this order:
#   tiny-eager, base-eager  benchmarks/inversion_speed.py for DeiT-Tiny / DeiT-Base at batch 32/64/128 (eager,
#                           float32, with the reference-style implementation and peak memory)
#   cuda-tests              the tests with a CUDA variant (the compiled step with CUDA graphs against eager,
#                           bfloat16 on the GPU)
#   tiny-compiled, base-compiled   the compiled step's timings (one process per batch size for Base)
#   base-bfloat16           DeiT-Base at batch 64/128 in bfloat16 (eager), with peak memory
#   base-bfloat16-compiled  DeiT-Base in bfloat16 with the compiled step (CUDA graphs), one process per batch
#                           size: eager bfloat16 is launch-bound at every sparse stage, and the paper's ratios
#                           (Table 8) look like half precision
# benchmarks/results/h200-2026-12-04.json holds the figures of the lent machines' calls;
# benchmarks/README.md's "On a GPU" cites them.
#
#   OUT=/tmp/gpu bash benchmarks/gpu_run.sh                # every section (more than one call: BUDGET stops it)
#   OUT=/tmp/gpu SECTIONS="cuda-tests base-compiled" bash benchmarks/gpu_run.sh
#   OUT=/tmp/gpu SECTIONS="base-bfloat16-compiled" bash benchmarks/gpu_run.sh   # not measured yet
#
# Each benchmark process appends its records to $OUT/gpu_records.jsonl as it ends, so a time-out keeps the
# finished ones; the whole script stays under BUDGET seconds (default 540).
set -u
OUT=${OUT:-/tmp/smi-gpu}
BUDGET=${BUDGET:-540}
SECTIONS=${SECTIONS:-tiny-eager base-eager cuda-tests tiny-compiled base-compiled base-bfloat16 base-bfloat16-compiled}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
RECORDS=$OUT/gpu_records.jsonl

python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.used,memory.total --format=csv

left() { echo $(( BUDGET - SECONDS )); }

bench() {  # bench LIMIT_SECONDS ARGS...: one benchmark process, its records appended to $RECORDS
    local limit=$1; shift
    (( limit > $(left) )) && limit=$(left)
    (( limit < 20 )) && { echo "skipped (budget spent): $*"; return; }
    echo "== bench $* (limit ${limit}s, ${SECONDS}s in)"
    timeout "$limit" python3 benchmarks/inversion_speed.py --json /tmp/records.json "$@" >/tmp/bench.log 2>&1
    local rc=$?
    sed '/^\[/,$d' /tmp/bench.log | tail -12  # the table (the JSON follows it)
    [[ $rc == 0 ]] && python3 -c "import json, sys; [print(json.dumps(r)) for r in json.load(open(sys.argv[1]))]" \
        /tmp/records.json >>"$RECORDS"
    echo "rc=$rc"
}

want() { [[ " $SECTIONS " == *" $1 "* ]]; }
COMPILED="--compile-step --no-reference --no-memory --public-iterations 0"

want tiny-eager && bench 120 --models deit_tiny_patch16_224 --batch-size 32,64,128
want base-eager && bench 120 --models deit_base_patch16_224 --batch-size 32,64 \
    && bench 110 --models deit_base_patch16_224 --batch-size 128

if want cuda-tests && (( $(left) >= 60 )); then
    echo "== CUDA tests (${SECONDS}s in)"
    timeout $(( $(left) > 150 ? 150 : $(left) )) python3 -m pytest -q -p no:cacheprovider -p no:logging \
        tests/test_inverter.py -k "cuda" -rs 2>&1 | tail -15
fi

want tiny-compiled && bench 600 --models deit_tiny_patch16_224 --batch-size 32,64,128 $COMPILED
if want base-compiled; then  # one process per batch size: a time-out loses one batch size, not all
    for batch in 64 128 32; do bench 170 --models deit_base_patch16_224 --batch-size $batch --quick $COMPILED; done
fi
want base-bfloat16 && bench 200 --models deit_base_patch16_224 --batch-size 64,128 --quick --precision bfloat16 \
    --no-reference --public-iterations 0
if want base-bfloat16-compiled; then
    for batch in 64 128 32; do bench 170 --models deit_base_patch16_224 --batch-size $batch --quick --precision bfloat16 $COMPILED; done
fi
echo "done in ${SECONDS}s"
