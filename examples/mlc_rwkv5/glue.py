"""The glue that checks the MLC-style port (model.py) with parity: everything a user writes.

    parity run --checkpoint fixtures/rwkv5_2-L2-C144-H12.pth \
        --backends reference,examples/mlc_rwkv5/glue.py:make_backend

It loads the port's own weights (parity.weights_map: names and the time_decay transform), runs the
port's own entry points (embed, then prefill or decode) under parity.capture's KernelRecorder,
names the kernel calls with the rules below, and returns the port's state in parity's layout.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import tvm
from tvm.runtime.vm import VirtualMachine

from parity.capture import CallNamer, KernelRecorder, Rule, drop_batch, flatten_heads, hvk_to_hkv, layers, name_state
from parity.errors import ParityError
from parity.weights_map import to_mlc_weights

_spec = importlib.util.spec_from_file_location("mlc_rwkv5_model", Path(__file__).with_name("model.py"))
port = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)  # dataclasses look themselves up there
_spec.loader.exec_module(port)


def rules(n: int, C: int) -> list[Rule]:
    """Which kernel call computes which stage, by kernel name, call order within a layer, shape."""
    b = {"adapt": drop_batch}  # the port keeps a batch axis of 1 on every activation
    return [
        Rule("layer_norm*", ["emb", *layers(n, "L{l}.att.ln1", "L{l}.ffn.ln2"), "ln_out"], **b),  # emb: pre_ln
        Rule("shift*", layers(n, "L{l}.att.shift", "L{l}.ffn.shift"), **b),
        # Lerps end in an add, in the order the port mixes: r, k, v, g; then the residuals and ffn k, r.
        Rule("add*", layers(n, *(f"L{{l}}.{s}" for s in ("att.xr", "att.xk", "att.xv", "att.xg", "x_after_att",
                                                          "ffn.xk", "ffn.xr", "x_out"))), shape=(1, None, C), **b),
        Rule("add*", layers(n, "L{l}.att.ln_x"), shape=(None, C)),  # GroupNorm's last op, (T, C)
        # Per layer: r, k, v, gate, output, ffn key, receptance, value; then the head.
        Rule("matmul*", [*layers(n, "L{l}.att.r", "L{l}.att.k", "L{l}.att.v", None, "L{l}.att.out", None, None, None),
                         None], **b),
        Rule("silu*", layers(n, "L{l}.att.g"), **b),
        Rule("wkv5_hvk", layers(n, ("L{l}.att.wkv", None)), **b),  # its state output: from the returned state
        # Two multiplies per lerp (4 in att, 2 in ffn), then gate * ln_x, and r * value(k).
        Rule("multiply*", layers(n, *[None] * 8, "L{l}.att.gated", *[None] * 4, "L{l}.ffn.out"), shape=(1, None, C), **b),
        Rule("tir_square*", layers(n, "L{l}.ffn.k"), **b),
        Rule("tir_sigmoid*", layers(n, "L{l}.ffn.r"), **b),
    ]


class MLCStylePort:
    name = "mlc-style-rwkv5"
    notes = ["prefill returns the last token's logits (and ln_out) only: compared on that row",
             "stages named from kernel calls by parity.capture rules; other calls are kernel.<n>.<symbol> records"]

    def __init__(self, checkpoint, *, head_size_divisor: int = 8, fuse: bool = False, rules=rules):
        cfg = checkpoint.config
        if cfg.version.value != "5.2":
            raise ParityError(f"the MLC-style port runs RWKV-5.2 only, not RWKV-{cfg.version.value}")
        self.n_layer = cfg.n_layer
        self.config = port.RWKV5Config(
            hidden_size=cfg.n_embd, intermediate_size=cfg.dim_ffn, num_hidden_layers=cfg.n_layer,
            num_heads=cfg.n_head, head_size=cfg.head_size, vocab_size=cfg.vocab_size,
            head_size_divisor=head_size_divisor)
        library, names = port.build(self.config, fuse=fuse)
        self.vm = VirtualMachine(tvm.runtime.load_module(str(library)), tvm.cpu())
        weights = to_mlc_weights({k: v.numpy() for k, v in checkpoint.fp32_weights().items()}, version="5.2")
        self.params = [tvm.runtime.tensor(weights[n]) for n in names]
        # wkv5_hvk writes two outputs; shape functions and weight transposes are not worth a record.
        self.recorder = KernelRecorder(self.vm, outputs={"wkv5_hvk": 2},
                                       skip=("vm.builtin.*", "shape_func*", "transpose*"))
        self.namer = CallNamer(rules(cfg.n_layer, cfg.n_embd), adapt={"L*.att.wkv": flatten_heads}, strict=True)
        self.state_shapes = port.RWKV5ForCausalLM(self.config).state_shapes()

    def reset(self):
        self.state = [tvm.runtime.tensor(np.zeros(s, "float32")) for s in self.state_shapes]

    def step(self, ids):
        with self.recorder.recording() as calls:
            x = self.vm["embed"](tvm.runtime.tensor(np.array([ids], "int32")), *self.params)
            logits, state = self.vm["prefill" if len(ids) > 1 else "decode"](x, self.state, *self.params)
        self.state = list(state)
        stages = self.namer(calls)
        stages.update(name_state(self.state, n_layer=self.n_layer, slots=("att_x", "att_kv", "ffn_x"),
                                 adapt={"*": drop_batch, "att_kv": hvk_to_hkv}))
        stages["logits"] = logits.numpy().reshape(1, -1)  # (1, 1, V): the last token's row
        return stages


def make_backend(checkpoint):
    return MLCStylePort(checkpoint)
