#!/usr/bin/env bash
# device (nvidia-h200 host: 16 CPUs; the GPU only for `parity synth`): scale rows at the HEAD in
# .scale/src (scripts/scale-job --prepare, SCALE_ZOO=0), one group of shapes per call:
#   bash benchmarks/results/scale-2026-12-01-device-3/job.sh --shapes 3b --jobs 3 --deadline 200
# Rows run side by side (scale.py --jobs: 16 // jobs threads each); a timer stops what still runs
# before the call's limit, and every finished row is already written to $OUT/scale.
set -u
S=$OUT/scale; mkdir -p "$S"
( sleep "${JOB_SECONDS:-545}"; echo "time's up: stopping what still runs" >> "$S/job.log"; pkill -f benchmarks/scale.py; pkill -f parity.cli; pkill -f "parity run" ) > /dev/null 2>&1 &
T0=$(date +%s)
SCALE_WORK=/tmp/w bash .scale/src/scripts/scale-job "$S" "$@" > "$S/job-stdout.log" 2>&1
echo "scale-job rc $? after $(( $(date +%s) - T0 )) s" >> "$S/job.log"
cat "$S/job.log"; tail -5 "$S/scale.log"; cat "$S/scale.md" 2>/dev/null | tail -12
exit 0
