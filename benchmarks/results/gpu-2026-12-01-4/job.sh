#!/usr/bin/env bash
# The lead's GPU call of 2026-12-01 (4th of the day): scripts/gpu-job at this commit (bench, fixtures + zoo,
# fp16, GPU-only mutants, graphs, refgpu, suite, suiteref, 0.4B; overhead/int8/lowp skipped: their builds
# did not change since they last passed) and, beside it on 4 of the 16 CPUs, two 0.1B scale rows
# (benchmarks/scale.py) to measure peak memory on a CUDA-torch host after the torch references moved
# into the parity process. Run from the repo root with .gpu and .scale carried (scripts/gpu-job --prepare,
# SCALE_SHAPES=0.1b@5.2 SCALE_ZOO=0 scripts/scale-job --prepare).
set -u
G=$OUT/g
mkdir -p "$G" "$OUT/scale" /tmp/gjob
( sleep 90
  OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 TVM_NUM_THREADS=2 taskset -c 12-15 bash .scale/src/scripts/scale-job "$OUT/scale" \
    --shapes 0.1b --prompts ones:16,scenario:chat-hello --jobs 2 --decode-steps 64 > "$OUT/scale-job.log" 2>&1 ) &
T_OVERHEAD=0 T_INT8=0 T_LOWP=0 JOB_BUDGET=${JOB_BUDGET:-430} \
  BENCH_ARGS="--shapes 1.5b --dtypes float16,float32 --prefill-len 256 --decode-steps 100 --no-overhead --no-relax-graph" \
  PACK_TO=$G/results.tar.gz GPU_DIR=$PWD/.gpu bash .gpu/src/scripts/gpu-job /tmp/gjob
wait
cp /tmp/gjob/job.log "$G/" 2>/dev/null
