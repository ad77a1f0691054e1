#!/bin/bash
# K3: stage the GPU call's bundle: snapshots base (3054196), new (HEAD + K3's working files), v2 (new, other tile sizes);
# their builds in one cache; the TVM runtime. -> .gpu-k3/carry/bundle.tar.xz + the ffi wheel.
set -euo pipefail
cd /work/main; . .venv/bin/activate
S=/tmp/k3stage; rm -rf $S/base $S/new $S/v2 $S/tvm; mkdir -p $S  # (the build cache stays: unchanged sources hit it)
R=benchmarks/results/gpu-2026-12-01-k3
FILES="parity/compiled/gemv_cuda.py parity/compiled/rwkv5_model.py parity/compiled/wkv_cuda.py parity/compiled/build.py parity/compiled/cuda.py parity/compiled/cuda_graph.py benchmarks/gpu.py benchmarks/kernel_count.py tests/compiled/test_gpu.py"
mkdir -p $S/base $S/new; git archive 3054196 | tar -x -C $S/base; echo 3054196 > $S/base/COMMIT
git archive HEAD | tar -x -C $S/new; for f in $FILES; do cp $f $S/new/$f; done; echo "${NEWCOMMIT:-$(git rev-parse --short HEAD)+k3}" > $S/new/COMMIT
cp -r $S/new $S/v2; echo "$(cat $S/new/COMMIT)-v2" > $S/v2/COMMIT
sed -i "s/^DECODE_WARPS = 8 /DECODE_WARPS = 16 /" $S/v2/parity/compiled/gemv_cuda.py
grep -n "^DECODE_WARPS\|^WKV_SPLIT" $S/v2/parity/compiled/*.py
cp $R/k3_compare.py $S/; cp -r .gpu-k3/bundle/tvm $S/tvm
export PARITY_LLVM_CPU=x86-64-v3 PARITY_CACHE_DIR=$S/build-cache
for v in base new v2; do
  what="big fixplain"; [ $v = new ] && what=all
  for w in $what; do (cd $S/$v && PYTHONPATH=$S/$v python /work/main/$R/k3_build.py $w 2>&1 | grep -v Warning | tail -3); done
done
[ "${1:-}" = v2fix ] && (cd $S/v2 && PYTHONPATH=$S/v2 python /work/main/$R/k3_build.py fixplain 2>&1 | grep -v Warning | tail -2)
mkdir -p .gpu-k3/carry; rm -f .gpu-k3/carry/*
tar -C $S -cJf .gpu-k3/carry/bundle.tar.xz base new v2 tvm build-cache k3_compare.py
cp .gpu-k3/bundle/*.whl .gpu-k3/carry/
du -sh .gpu-k3/carry/*
