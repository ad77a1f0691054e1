"""Kernels per layer of the plain CUDA build's decode step (issue 10): lowered here, no GPU needed.

In a CUDA graph each kernel costs ~1-2 us whatever it computes, so the count sets a floor on a step.
A v5.2 decode layer is 5 launches in fp32 and fp16 alike (gemv_cuda.py's decode kernels, each GEMV
with what feeds it and what follows it): ln1 + token shift + lerps + the r/k/v/g GEMV; the scan with
GroupNorm and the gate; the output GEMV + residual; ln2 + the FFN's lerps + its key and receptance
GEMVs (relu^2, sigmoid); the value GEMV + r*v + residual. It was 10 with DLight's GEMVs and the
LayerNorms on their own, 14 before the grouped GEMV and the fused scan, 24 in fp32 and 35 in fp16
before that (benchmarks/results/kernel-count-*.md, gpu-2026-12-01-k3).
"""

from __future__ import annotations

import re

from parity.synthetic import make_config


def decode_launches(*, n_layer: int, dtype: str) -> int:
    import tvm
    from tvm.relax.frontend import nn

    from parity.compiled import build

    cfg = make_config(n_layer=n_layer, n_embd=128, head_size=64, vocab_size=64)
    model = build.model_for(cfg, debug=False, target="cuda", dtype=dtype)
    # decode alone (the default spec's decode entry): lowering prefill too would double the time.
    state = [nn.spec.Tensor(list(s), "float32") for s in model.layout.all_shapes(n_layer)]
    spec = {"decode": {"ids": nn.spec.Tensor([1], "int32"), "state": state,
                       "$": {"param_mode": "plain", "effect_mode": "none"}}}
    mod, _ = model.export_tvm(spec=nn.spec.ModuleSpec.from_raw(spec, model))
    target = build.make_target("cuda")
    with target:
        mod = build.compile_pipeline("cuda", target)(mod)
    # A TIR function launches one kernel per loop nest bound to blockIdx.x.
    launches = {gv.name_hint: max(1, f.script().count('thread="blockIdx.x"'))
                for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}
    called = re.findall(r"^\s*(?:\w+ = )?(\w+)\(", mod["decode"].script(), re.M)
    return sum(launches[name] for name in called if name in launches)


def test_a_decode_layer_is_five_kernel_launches() -> None:
    # fp16, where the casts were (fp32 counts the same: benchmarks/kernel_count.py). Two layers, so
    # a decay kernel per layer (6 each) would show; the other five launches are the embedding's
    # gather and ln0, every layer's decay, then ln_out and the head's GEMV.
    assert decode_launches(n_layer=2, dtype="float16") == 5 + 2 * 5
