#!/bin/bash
# K4's GPU call 2: base (HEAD before K4's change: parity/compiled = b7c16d8) vs two candidates to commit, final and
# final2, one H200: the GPU tests on each candidate, bench all three (fp16, fp32), compare each candidate vs base.
# (As run in call 2 the tests() line lacked its mkdir: the 5 fixture tests failed writing gpu-tests.json after all their assertions; fixed here, not re-run.)
# run(command="bash .gpu-k4/job2.sh 2>&1 | tail -70", timeout_s=280, carry=[".gpu-k4/carry2", ".gpu-k4/job2.sh"])
set -uo pipefail
ROOT=$PWD; G=/tmp/k4; W=$G/out; mkdir -p $G $W $OUT
S=$SECONDS; log() { echo "[+$((SECONDS - S))s] $*" | tee -a $W/job.log; }
pack() { tar -C $W -czf $OUT/k4-call2.tar.gz . ; }
tar -C $G -xJf $ROOT/.gpu-k4/carry2/bundle.tar.xz
python3 -m pip install --no-deps --no-index $ROOT/.gpu-k4/carry2/*.whl -q 2>&1 | tail -2
export TVM_USE_RUNTIME_LIB=1 PARITY_LLVM_CPU=x86-64-v3 PARITY_CACHE_DIR=$G/build-cache PARITY_GPU_CACHE_DIR=$G/build-cache PYTHONUNBUFFERED=1
nvidia-smi > $W/nvidia-smi.txt 2>&1; log "setup"
py() { local v=$1; shift; (cd $G/$v && PYTHONPATH=$G:$G/$v "$@"); }
bench() { py $1 timeout $3 python3 $G/k4_bench.py $W/bench-$1.json $2 > $W/bench-$1.txt 2>&1; log "bench $1 $2: exit $?"; grep -v "Warn\|_warn" $W/bench-$1.txt | head -16; pack; }
cmp() { py $1 timeout 60 python3 $G/k4_compare.py run $G/cmp-$1.npz > $W/cmp-$1.txt 2>&1; log "compare $1: exit $?"; }
diffs() { python3 $G/k4_compare.py diff $G/cmp-base.npz $G/cmp-$1.npz > $W/diff-base-$1.txt 2>&1; log "diff base $1: exit $?"; cut -c1-100 $W/diff-base-$1.txt | grep -v "/state" | head -14; pack; }
PT=(python3 -m pytest -p no:cacheprovider -q -rfEs -p parity.pytest_plugin)
tests() { mkdir -p $W/gpu-$1; py $1 env PARITY_GPU_OUT=$W/gpu-$1 timeout 80 "${PT[@]}" --junitxml $W/tests-$1.xml tests/compiled/test_gpu.py -m gpu \
  -k "test_cuda_parity_every_fixture or test_cuda_graphs_compute_what_the_plain_build_does" > $W/tests-$1.txt 2>&1
  log "tests $1: exit $? $(tail -1 $W/tests-$1.txt)"; grep -E "FAILED|Error" $W/tests-$1.txt | head -6; pack; }
tests final; tests final2
bench final float16,float32 60; bench final2 float16,float32 60; bench base float16,float32 60
cmp base; cmp final; diffs final; cmp final2; diffs final2
log done; pack
