#!/usr/bin/env bash
# The lead's GPU calls of 2026-12-01 (5th of the day): scripts/gpu-job over 72a8e5f, whose parity/compiled is the
# final one of issue 10 (K7's FFN value GEMV, a128c29). Call 1 (PART=1): bench (1.5B fp16/fp32, 100 decode steps),
# every fixture + the zoo on CUDA, fp16, the GPU-only mutants, graphs, refgpu, suite. Call 2 (PART=2): suiteref,
# overhead, 04b, int8, lowp. Call 3 (PART=3, at 0c2b1cb): the bench at 0.4B and 1.5B. Run from the repo root with .gpu carried (scripts/gpu-job --prepare).
set -u
G=$OUT/g
mkdir -p "$G" /tmp/gjob
SHAPES=1.5b
if [[ ${PART:-1} == 1 ]]; then
  skip=(T_SUITEREF=0 T_OVERHEAD=0 T_04B=0 T_INT8=0 T_LOWP=0)
elif [[ ${PART} == 3 ]]; then  # the bench alone, 0.4B beside 1.5B (a later call: --prepare at 0c2b1cb built 0.4B fp16 too)
  skip=(T_BENCH=300 T_FP32=0 T_FP16=0 T_MUTANTS=0 T_GRAPHS=0 T_REFGPU=0 T_SUITE=0 T_SUITEREF=0 T_OVERHEAD=0 T_04B=0 T_INT8=0 T_LOWP=0)
  SHAPES=0.4b,1.5b
else
  skip=(T_BENCH=0 T_FP32=0 T_FP16=0 T_MUTANTS=0 T_GRAPHS=0 T_REFGPU=0 T_SUITE=0)
fi
env "${skip[@]}" JOB_BUDGET=${JOB_BUDGET:-540} \
  BENCH_ARGS="--shapes $SHAPES --dtypes float16,float32 --prefill-len 256 --decode-steps 100 --no-overhead --no-relax-graph" \
  PACK_TO=$G/results.tar.gz GPU_DIR=$PWD/.gpu bash .gpu/src/scripts/gpu-job /tmp/gjob
cp /tmp/gjob/job.log "$G/" 2>/dev/null
