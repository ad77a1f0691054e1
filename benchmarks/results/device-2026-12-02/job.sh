#!/usr/bin/env bash
# device (nvidia-h200 host: 16 CPUs; the GPU only for `parity synth`), one call: the bug zoo at the
# 0.4B shape (scripts/scale-job --zoo, 6 processes x 2 threads) beside the 0.4B long decode (256
# steps, benchmarks/long_decode.py, 4 threads), at the HEAD in .scale/src (scripts/scale-job --prepare
# with the zoo's builds). A timer stops what still runs before the call's limit; finished rows are
# already written under $OUT.
#   bash benchmarks/results/device-2026-12-02/job.sh [zoo|long|both]
set -u
WHAT=${1:-both}
SCALE=$PWD/.scale; SRC=$SCALE/src; W=/tmp/w; mkdir -p "$W" "$OUT"
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a "$OUT/job.log"; }
( sleep "${JOB_SECONDS:-550}"; el "time's up: stopping what still runs"; pkill -f parity.cli; pkill -f long_decode.py ) > /dev/null 2>&1 &
[[ -d $SCALE/cache ]] || tar -C "$SCALE" -xJf "$SCALE/cache.tar.xz"
python3 -m pip install --no-deps --no-index "$PWD"/.gpu/*.whl "$SCALE"/wheels/*.whl -q 2>&1 | tail -2
export PYTHONPATH=$PWD/.gpu:$SRC TVM_USE_RUNTIME_LIB=1 PARITY_LLVM_CPU=x86-64-v3 PARITY_CACHE_DIR=$SCALE/cache
export PARITY_COMMIT=$(cat "$SCALE/COMMIT")
cd "$SRC"; (nproc; free -g; lscpu | grep -i "model name") > "$OUT/machine.txt" 2>&1
for v in 5.2 4; do
  PARITY_SYNTH_DEVICE=cuda python3 -m parity.cli synth --shape 0.4b --version $v "$W/rwkv$v-0.4b.safetensors" > "$OUT/synth-$v.log" 2>&1
  el "synth 0.4b v$v rc $?"
done
PIDS=()
if [[ $WHAT != long ]]; then
  ( OMP_NUM_THREADS=2 GPU_DIR=$SCALE/../.gpu bash scripts/scale-job --zoo "$OUT/zoo" "$W/rwkv4-0.4b.safetensors" "$W/rwkv5.2-0.4b.safetensors" 6 > "$OUT/zoo.log" 2>&1
    el "zoo rc $?" ) & PIDS+=($!)
fi
if [[ $WHAT != zoo ]]; then
  ( OMP_NUM_THREADS=4 MKL_NUM_THREADS=4 TVM_NUM_THREADS=4 python3 benchmarks/long_decode.py --checkpoints "$W/rwkv5.2-0.4b.safetensors" \
      --ids ones:16 --decode-steps 256 --out "$OUT/long" > "$OUT/long.log" 2>&1
    el "long decode rc $?" ) & PIDS+=($!)
fi
wait "${PIDS[@]}"
el "done"
tail -3 "$OUT"/zoo/*.log 2>/dev/null; cat "$OUT/long/long_decode.md" 2>/dev/null
exit 0
