#!/bin/bash
# K4's GPU call 1: base (HEAD, parity/compiled = b7c16d8) and six variants of the decode GEMV constants, one H200.
# run(command="bash .gpu-k4/job1.sh 2>&1 | tail -80", timeout_s=300, carry=[".gpu-k4/carry", ".gpu-k4/job1.sh"])
set -uo pipefail
ROOT=$PWD; G=/tmp/k4; W=$OUT/k4; mkdir -p $G $W
S=$SECONDS; log() { echo "[+$((SECONDS - S))s] $*" | tee -a $W/job.log; }
tar -C $G -xJf $ROOT/.gpu-k4/carry/bundle.tar.xz
python3 -m pip install --no-deps --no-index $ROOT/.gpu-k4/carry/*.whl -q 2>&1 | tail -2
export TVM_USE_RUNTIME_LIB=1 PARITY_LLVM_CPU=x86-64-v3 PARITY_CACHE_DIR=$G/build-cache PARITY_GPU_CACHE_DIR=$G/build-cache PYTHONUNBUFFERED=1
nvidia-smi > $W/nvidia-smi.txt 2>&1; log "setup"
py() { local v=$1; shift; (cd $G/$v && PYTHONPATH=$G:$G/$v "$@"); }
bench() { py $1 timeout $3 python3 $G/k4_bench.py $W/bench-$1.json $2 > $W/bench-$1.txt 2>&1; log "bench $1 $2: exit $?"; cat $W/bench-$1.txt | grep -v Warn | head -20; }
cmp() { py $1 timeout 60 python3 $G/k4_compare.py run $G/cmp-$1.npz > $W/cmp-$1.txt 2>&1; log "compare $1: exit $?"; tail -2 $W/cmp-$1.txt; }
diffs() { python3 $G/k4_compare.py diff $G/cmp-base.npz $G/cmp-$1.npz > $W/diff-base-$1.txt 2>&1; log "diff base $1: exit $?"; cut -c1-110 $W/diff-base-$1.txt | head -30; }
bench base float16,float32 60
for v in rpw2 rpw2mb3 att4 mb3 rpw4 att8val8; do bench $v float16 40; done
cmp base; cmp rpw2; diffs rpw2; cmp rpw2mb3; diffs rpw2mb3
log done
