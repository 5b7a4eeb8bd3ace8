#!/usr/bin/env bash
# The GPU figures of the speed benchmark in one call of a lent GPU machine, under that machine's own torch
# and timm (nothing installed): benchmarks/inversion_speed.py for DeiT-Tiny and DeiT-Base at batch 32/64/128
# (eager, float32, with the reference-style implementation and peak memory), the CUDA tests (the compiled
# step with CUDA graphs against eager), then the compiled step's timings for DeiT-Tiny at batch 32/64/128.
# benchmarks/results/h200-2026-12-04.json holds the figures of a call of this script (whose compiled step then
# ran batch 32 alone) and of one more call for the compiled step at 64 and 128; the README's "On a GPU" cites them.
#
#   OUT=/tmp/gpu bash benchmarks/gpu_run.sh
#
# Each benchmark process appends its records to $OUT/gpu_records.jsonl as it ends, so a time-out keeps the
# finished ones; the whole script stays under BUDGET seconds (default 540).
set -u
OUT=${OUT:-/tmp/smi-gpu}
BUDGET=${BUDGET:-540}
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

bench 120 --models deit_tiny_patch16_224 --batch-size 32,64,128
bench 120 --models deit_base_patch16_224 --batch-size 32,64
bench 110 --models deit_base_patch16_224 --batch-size 128

echo "== CUDA tests (${SECONDS}s in)"
(( $(left) >= 60 )) && timeout $(( $(left) > 150 ? 150 : $(left) )) python3 -m pytest -q -p no:cacheprovider -p no:logging tests/test_inverter.py -k cuda 2>&1 | tail -15

bench 600 --models deit_tiny_patch16_224 --batch-size 32,64,128 --compile-step --no-reference --no-memory --public-iterations 0
echo "done in ${SECONDS}s"
