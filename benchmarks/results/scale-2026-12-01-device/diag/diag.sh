#!/usr/bin/env bash
# device: where a 0.1B run's memory goes on the CUDA-torch host (per-process RSS over time), and torch's fixed cost.
set -u
REPO=$PWD; SCALE=$REPO/.scale; SRC=$SCALE/src; O=$1; W=/tmp/w; mkdir -p $W $O
python3 -m pip install --no-deps --no-index $SCALE/bundle/*.whl $SCALE/wheels/*.whl -q 2>&1 | tail -2
export PYTHONPATH=$SCALE/bundle:$SRC TVM_USE_RUNTIME_LIB=1 PARITY_LLVM_CPU=x86-64-v3 PARITY_CACHE_DIR=$SCALE/cache PYTHONUNBUFFERED=1
cd $SRC
for m in "import numpy" "import torch" "import torch; torch.cuda.is_available()" "import torch; torch.zeros(1).cuda()" "import sys; sys.modules['torch']=None; import tvm" "import tvm" "import parity.session" "import rwkv.model"; do
  python3 -c "
import resource
$m
print('$m', '->', round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024), 'MiB')" 2>&1 | tail -1
done > $O/imports.txt
python3 -c "import torch; print(torch.__version__)" >> $O/imports.txt
OMP_NUM_THREADS=4 PARITY_SYNTH_DEVICE=cuda python3 -m parity.cli synth --force --shape 0.1b --version 5.2 $W/ck.safetensors > $O/synth.log 2>&1
export OMP_NUM_THREADS=8 MKL_NUM_THREADS=8 TVM_NUM_THREADS=8
python3 $SCALE/sample.py python3 -m parity.cli run --checkpoint $W/ck.safetensors --backends reference,tvm,chatrwkv --ids ones:16 --decode-steps 4 --dump-dir $W/d1 --json $O/ones.json > $O/ones-sample.txt 2>&1
python3 -c "
import json; d=json.load(open('$O/ones.json')); r=d.get('run',{})
print({k: v for k, v in r.items() if 'torch' in k or 'worker' in k or 'memory' in k})" > $O/ones-run.txt 2>&1
grep -c . $O/ones-sample.txt; grep PEAK $O/ones-sample.txt
