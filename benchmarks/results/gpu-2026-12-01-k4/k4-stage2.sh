#!/bin/bash
# K4: stage call 2: snapshots base (HEAD before K4's change: parity/compiled = b7c16d8) and final (HEAD + the working
# tree's gemv_cuda.py, the constants to commit), their builds (final: also the debug and graph builds the GPU tests
# use) -> .gpu-k4/carry2/bundle.tar.xz + the ffi wheel.   BASE=<commit> bash k4-stage2.sh
set -euo pipefail
cd /work/main; . .venv/bin/activate
S=/tmp/k4stage2; R=benchmarks/results/gpu-2026-12-01-k4
rm -rf $S; mkdir -p $S/base $S/final
git archive ${BASE:-HEAD} | tar -x -C $S/base; echo "${BASE:-$(git rev-parse --short HEAD)}" > $S/base/COMMIT
git archive HEAD | tar -x -C $S/final; cp parity/compiled/gemv_cuda.py $S/final/parity/compiled/; echo "${FINAL:-$(git rev-parse --short HEAD)+k4}" > $S/final/COMMIT
cp -r $S/final $S/final2; echo "$(cat $S/final/COMMIT)-2" > $S/final2/COMMIT  # final2: another candidate (sed)
sed -i 's/^DECODE_WARPS_BY = .*  #/DECODE_WARPS_BY = {"rmul_residual": 4}  #/' $S/final2/parity/compiled/gemv_cuda.py
for v in final final2; do echo "$v: $(grep -h "^DECODE_" $S/$v/parity/compiled/gemv_cuda.py | cut -d'#' -f1 | tr '\n' ';')"; done
cp $R/k4_compare.py $R/k4_bench.py $S/; cp -r .gpu-k3/bundle/tvm $S/tvm
export PARITY_LLVM_CPU=x86-64-v3 PARITY_CACHE_DIR=$S/build-cache
b() { (cd $S/$1 && PYTHONPATH=$S/$1 python /work/main/$R/k4_build.py $2 2>&1 | grep -v Warning | tail -12); }
( b base big; b base fixplain; b final2 debugs ) &
( b final all; b final2 nodebug ) &
wait
mkdir -p .gpu-k4/carry2; rm -f .gpu-k4/carry2/*
tar -C $S -cJf .gpu-k4/carry2/bundle.tar.xz base final final2 tvm build-cache k4_compare.py k4_bench.py
cp .gpu-k3/bundle/*.whl .gpu-k4/carry2/
du -sh .gpu-k4/carry2/*
echo STAGED
