#!/usr/bin/env bash
# device (nvidia-h200 host's 16 CPUs; the GPU for synth and the arbiter's reference): the scale rows whose
# memory misses 1.3x (0.1B x4, RWKV-4 0.4B scenario) at the HEAD in .scale/src, and the 1.5B random:64:3
# near miss under --arbiter (reference and fp64 on the GPU, tvm on the CPU). Deadline timer first.
set -u
REPO=$PWD; SCALE=$REPO/.scale; SRC=$SCALE/src; FINAL=$1; OUT=/tmp/out; W=/tmp/w; mkdir -p $W $OUT
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a $OUT/job.log; }
pack() { tar -C /tmp -czf $FINAL/out.tgz.tmp out 2>/dev/null; mv -f $FINAL/out.tgz.tmp $FINAL/out.tgz 2>/dev/null; cp $OUT/job.log $FINAL/job.log 2>/dev/null; }
( sleep ${JOB_SECONDS:-500}; el "time's up: stopping what still runs"; pkill python3; sleep 4; pack ) > /dev/null 2>&1 & KILLER=$!
( while sleep 30; do pack; done ) > /dev/null 2>&1 & PACKER=$!
[[ -d $SCALE/cache ]] || tar -C $SCALE -xJf $SCALE/cache.tar.xz
python3 -m pip install --no-deps --no-index $SCALE/bundle/*.whl $SCALE/wheels/*.whl -q 2>&1 | tail -2
el "installed"
export PYTHONPATH=$SCALE/bundle:$SRC TVM_USE_RUNTIME_LIB=1 PARITY_LLVM_CPU=x86-64-v3 PARITY_CACHE_DIR=$SCALE/cache PARITY_COMMIT="$(cat $SCALE/COMMIT)" PYTHONUNBUFFERED=1
cd "$SRC"; (nproc; free -g; nvidia-smi -L; lscpu | grep -i "model name"; python3 -c "import torch; print(torch.__version__)") > $OUT/machine.txt 2>&1
lim() { env OMP_NUM_THREADS=$1 MKL_NUM_THREADS=$1 TVM_NUM_THREADS=$1 "${@:2}"; }
synth() { OMP_NUM_THREADS=4 PARITY_SYNTH_DEVICE=cuda python3 -m parity.cli synth --force --shape $1 --version $2 $W/rwkv$2-$1.safetensors > $OUT/synth-$1-$2.log 2>&1; el "synth $1 v$2 done (rc $?)"; }
row() {  # row THREADS SHAPE VERSION PROMPT STEPS TAG
  mkdir -p $W/$6 $OUT/$6; ln -sf $W/rwkv$3-$2.safetensors $W/$6/
  el "row $6 start"
  lim $1 python3 benchmarks/scale.py --shapes $2@$3 --prompts $4 --decode-steps $5 --work $W/$6 --out $OUT/$6 > $OUT/$6/log.txt 2>&1
  el "row $6 done (rc $?)"; pack
}
arbiter() {
  mkdir -p $OUT/15-arbiter; el "arbiter start"
  lim 6 /usr/bin/time -v python3 -m parity.cli run --checkpoint $W/rwkv5.2-1.5b.safetensors --backends reference,tvm \
    --ids random:64:3 --decode-steps 64 --arbiter --reference-device cuda --dump-dir $W/arb-dumps \
    --json $OUT/15-arbiter/result.json -q > $OUT/15-arbiter/log.txt 2>&1
  el "arbiter done (rc $?)"
  python3 - $OUT/15-arbiter/result.json > $OUT/15-arbiter/summary.txt 2>&1 <<'PYEOF'
import json, sys, collections
d = json.load(open(sys.argv[1]))
print("verdict", d.get("verdict"), "drift", {k: d["drift"].get(k) for k in ("status", "worst_ratio", "worst_stage", "worst_step", "envelope", "envelope_fraction", "floor")})
e = d.get("end_to_end") or {}
print("e2e", {k: e.get(k) for k in ("kl_max", "kl_mean", "top1_agreement", "top1_flips")})
for a in d.get("arbiter") or []:
    recs = a["records"]
    print("arbiter", a["backend"], a["verdict"], "records", len(recs))
    ratio = lambda r: r["actual_error"] / r["reference_error"] if r["reference_error"] > 0 else float("inf")
    worst = sorted(recs, key=ratio)[-5:]
    for r in worst: print("  worst", r["step"], r["stage"], round(ratio(r), 3), r["actual_error"], r["reference_error"])
    lg = [r for r in recs if r["stage"] == "logits"]
    rs = [ratio(r) for r in lg]
    print("  logits ratio min/median/max", min(rs), sorted(rs)[len(rs)//2], max(rs), "n", len(rs))
    for s in (0, 1, 8, 32, 63, 64):
        for r in lg:
            if r["step"] == s: print("  logits step", s, r["actual_error"], r["reference_error"], round(ratio(r), 3))
    by_stage = collections.defaultdict(list)
    for r in recs: by_stage[r["stage"].split(".", 1)[-1]].append(ratio(r))
    print("  median ratio by stage kind:", {k: round(sorted(v)[len(v)//2], 3) for k, v in sorted(by_stage.items()) if len(v) > 10})
PYEOF
  pack
}
( synth 0.1b 5.2
  row 1 0.1b 5.2 ones:16 64 01-ones & row 1 0.1b 5.2 random:64:3 64 01-random & row 1 0.1b 5.2 scenario:chat-hello 64 01-chat & row 2 0.1b 5.2 random:512:5 64 01-512 &
  synth 0.4b 4
  row 2 0.4b 4 scenario:chat-hello 64 v4-chat &
  synth 1.5b 5.2
  arbiter &
  wait )
el "all done"
kill $PACKER; pkill -P $KILLER; kill $KILLER 2>/dev/null; pack; exit 0
