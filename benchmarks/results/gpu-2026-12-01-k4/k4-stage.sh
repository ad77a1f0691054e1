#!/bin/bash
# K4: stage call 1: snapshots base (HEAD: its parity/compiled is b7c16d8's) and variants of the working gemv_cuda.py
# (one constant each, by sed), their builds in one cache, the TVM runtime -> .gpu-k4/carry/bundle.tar.xz + the ffi wheel.
set -euo pipefail
cd /work/main; . .venv/bin/activate
S=/tmp/k4stage; R=benchmarks/results/gpu-2026-12-01-k4
rm -rf $S; mkdir -p $S/base
git archive HEAD | tar -x -C $S/base; echo "$(git rev-parse --short HEAD)" > $S/base/COMMIT
mk() {  # mk NAME 'python-line-to-replace' 'replacement'
  local v=$1; cp -r $S/base $S/$v; cp parity/compiled/gemv_cuda.py $S/$v/parity/compiled/gemv_cuda.py
  echo "$(cat $S/base/COMMIT)+k4-$v" > $S/$v/COMMIT
  [ -n "${2:-}" ] && sed -i "s/^$2/$3/" $S/$v/parity/compiled/gemv_cuda.py
  grep -n "^DECODE_" $S/$v/parity/compiled/gemv_cuda.py | tr '\n' ' ' | cut -c1-300; echo " <- $v"
}
mk new
mk rpw2 "DECODE_ROWS_PER_WARP = 1 " "DECODE_ROWS_PER_WARP = 2 "
mk rpw4 "DECODE_ROWS_PER_WARP = 1 " "DECODE_ROWS_PER_WARP = 4 "
mk mb3 "DECODE_MIN_BLOCKS_BY = {} " "DECODE_MIN_BLOCKS_BY = {\"ln\": 3} "
mk rpw2mb3 "DECODE_MIN_BLOCKS_BY = {} " "DECODE_MIN_BLOCKS_BY = {\"ln\": 3} "
sed -i "s/^DECODE_ROWS_PER_WARP = 1 /DECODE_ROWS_PER_WARP = 2 /" $S/rpw2mb3/parity/compiled/gemv_cuda.py
mk att4 "DECODE_WARPS_BY = {} " "DECODE_WARPS_BY = {\"residual\": 4} "
mk att8val8 "DECODE_WARPS_BY = {} " "DECODE_WARPS_BY = {\"residual\": 8, \"rmul_residual\": 8} "
grep -n "^DECODE_" $S/rpw2mb3/parity/compiled/gemv_cuda.py | tr '\n' ' '; echo
cp $R/k4_compare.py $R/k4_bench.py $S/; cp -r .gpu-k3/bundle/tvm $S/tvm
export PARITY_LLVM_CPU=x86-64-v3 PARITY_CACHE_DIR=$S/build-cache
b() { (cd $S/$1 && PYTHONPATH=$S/$1 python /work/main/$R/k4_build.py $2 2>&1 | grep -v Warning | tail -4); }
( b base big; b rpw2 big; b rpw2 fixplain; b att4 big16; b rpw4 big16 ) &
( b base fixplain; b rpw2mb3 big; b rpw2mb3 fixplain; b mb3 big16; b att8val8 big16 ) &
wait
mkdir -p .gpu-k4/carry; rm -f .gpu-k4/carry/*
tar -C $S -cJf .gpu-k4/carry/bundle.tar.xz base rpw2 rpw4 mb3 rpw2mb3 att4 att8val8 tvm build-cache k4_compare.py k4_bench.py
cp .gpu-k3/bundle/*.whl .gpu-k4/carry/
du -sh .gpu-k4/carry/*
echo STAGED
