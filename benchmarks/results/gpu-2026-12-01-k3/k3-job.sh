#!/bin/bash
# K3's GPU call: base (3054196), new (K3's decode kernels), v2 (new with 16 warps a GEMV block), one H200.
set -uo pipefail
ROOT=$PWD; G=/tmp/k3; W=$G/out; mkdir -p $G $W $OUT
S=$SECONDS; log() { echo "[+$((SECONDS - S))s] $*" | tee -a $W/job.log; }
pack() { tar -C $W -czf $OUT/k3-results.tar.gz . ; cp $W/job.log $OUT/job.log 2>/dev/null; }
tar -C $G -xJf $ROOT/.gpu-k3/carry/bundle.tar.xz
python3 -m pip install --no-deps --no-index $ROOT/.gpu-k3/carry/*.whl -q 2>&1 | tail -2
export TVM_USE_RUNTIME_LIB=1 PARITY_LLVM_CPU=x86-64-v3 PARITY_CACHE_DIR=$G/build-cache PARITY_GPU_CACHE_DIR=$G/build-cache PYTHONUNBUFFERED=1
nvidia-smi > $W/nvidia-smi.txt 2>&1
py() { local v=$1; shift; (cd $G/$v && PYTHONPATH=$G:$G/$v "$@"); }
cmp() { py $1 timeout 80 python3 $G/k3_compare.py run $W/cmp-$1.npz > $W/cmp-$1.txt 2>&1; log "compare $1: exit $?"; tail -3 $W/cmp-$1.txt; }
diffs() { python3 $G/k3_compare.py diff $W/cmp-base.npz $W/cmp-$1.npz > $W/diff-base-$1.txt 2>&1; log "diff base $1: exit $?"; cat $W/diff-base-$1.txt; }
bench() { local v=$1 t=$2; shift 2; py $v timeout $t python3 benchmarks/gpu.py --out $W/bench-$v --commit $(cat $G/$v/COMMIT) --shapes 1.5b --dtypes float16,float32 \
  --prefill-len 256 --decode-steps 100 --no-overhead --no-relax-graph --profile "$@" > $W/bench-$v.txt 2>&1; log "bench $v: exit $?"; grep -h "^| 1.5b\|profile:" $W/bench-$v/gpu-bench.md | cut -c1-400; pack; }
cmp base; cmp new; diffs new; pack
bench new 90; bench base 90
PT=(python3 -m pytest -p no:cacheprovider -q -rfEs -p parity.pytest_plugin)
py new env PARITY_GPU_OUT=$W timeout 100 "${PT[@]}" --junitxml $W/tests-new.xml tests/compiled/test_gpu.py -m gpu \
  -k "test_cuda_parity_every_fixture or test_cuda_graphs_compute_what_the_plain_build_does" > $W/tests-new.txt 2>&1
log "tests new: exit $? $(tail -1 $W/tests-new.txt)"; grep -E "FAILED|Error" $W/tests-new.txt | head -8; pack
bench v2 70; cmp v2; diffs v2
rm -f $W/*.npz; pack; log done
