"""The MLC-style port compiled with fusion, as a production build is: the rules for that build.

Fusion merges most canonical stages into the kernel that consumes them (a matmul with its
residual add, the gate's matmul with SiLU and the ln_x product), so fewer stages can be named:
these rules name those a fused kernel still outputs whole, and the comparison points less
closely in between. Everything else is glue.py's.

    parity run --checkpoint fixtures/rwkv5_2-L2-C144-H12.pth \
        --backends reference,examples/mlc_rwkv5/fused.py:make_backend
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

from parity.capture import Rule, drop_batch, layers

_spec = importlib.util.spec_from_file_location("mlc_rwkv5_glue", Path(__file__).with_name("glue.py"))
glue = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(glue)


def fused_rules(n: int, C: int) -> list[Rule]:
    b = {"adapt": drop_batch}
    return [
        Rule("layer_norm*", ["emb", *layers(n, "L{l}.att.ln1", "L{l}.ffn.ln2"), "ln_out"], **b),
        Rule("*shift*", layers(n, "L{l}.att.shift", "L{l}.ffn.shift"), **b),
        Rule("wkv5_hvk", layers(n, ("L{l}.att.wkv", None)), **b),
        # GroupNorm's last op: (T, C) in the prefill; in a decode step fused with the sqrt and the
        # reshapes into one kernel of (1, 1, C).
        Rule(re.compile(r"fused_multiply\d*_add\d*(_tir_sqrt_.*)?"), layers(n, "L{l}.att.ln_x"),
             shape=lambda s: s[-1] == C, adapt=lambda x: x.reshape(-1, C)),
        Rule("fused_matmul*_silu*_multiply*", layers(n, "L{l}.att.gated"), **b),  # gate(x) -> SiLU -> * ln_x
        Rule(re.compile(r"fused_matmul\d*_add\d*"), layers(n, "L{l}.x_after_att"), **b),  # output matmul + residual
        Rule("fused_matmul*_relu*_tir_square*", layers(n, "L{l}.ffn.k"), **b),
        Rule("fused_matmul*_tir_sigmoid*_multiply*_add*", layers(n, "L{l}.x_out"), **b),  # r * value(k) + residual
    ]


def make_backend(checkpoint):
    return glue.MLCStylePort(checkpoint, fuse=True, rules=fused_rules)


def make_planted(checkpoint):
    """The fused build with ln_x eps 1e-5, the bug of planted.py."""
    return glue.MLCStylePort(checkpoint, fuse=True, rules=fused_rules, head_size_divisor=1)
