"""The plain CUDA build's grouped form (rwkv5_model.group_projections; issue 10), checked without a GPU:
which builds get it, and that each stacked parameter names its checkpoint tensors in the order its
kernels read them. (On a GPU: tests/compiled/test_gpu.py, the instrumented parity run and the graphs.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from parity.checkpoint import expected_shapes, load_checkpoint
from parity.compiled import build
from parity.compiled.rwkv5_model import Attention

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"


def _model(name: str, **kw):
    return build.model_for(load_checkpoint(FIXTURES / f"{name}.pth").config, **kw)


def test_only_the_plain_cuda_build_of_a_gated_v5_is_grouped() -> None:
    assert _model("rwkv5_2-L2-C144-H12", debug=False, target="cuda").param_groups()
    assert _model("rwkv5_1-L2-C64-H8", debug=False, target="cuda", dtype="float16").param_groups()
    for name, kw in (("rwkv5_2-L2-C144-H12", dict(debug=False, target="llvm")),  # every llvm build
                     ("rwkv5_2-L2-C144-H12", dict(debug=True, target="cuda")),  # the taps' build
                     ("rwkv5_2-L2-C144-H12", dict(debug=False, target="cuda", dtype="fp16i8")),  # quantised
                     ("rwkv5_0-L2-C64-H2", dict(debug=False, target="cuda")),  # no gate
                     ("rwkv4-L2-C64", dict(debug=False, target="cuda"))):
        assert _model(name, **kw).param_groups() == {}, (name, kw)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_stacked_parameters_are_made_of_their_checkpoint_tensors(dtype) -> None:
    ck = load_checkpoint(FIXTURES / "rwkv5_2-L2-C144-H12.pth")
    shapes = expected_shapes(ck.config)
    model = build.model_for(ck.config, debug=False, target="cuda", dtype=dtype)
    params = dict(model.named_parameters())
    groups = model.param_groups()
    for name, keys in groups.items():
        # each source exists and has one shape; the stack adds the leading axis
        assert len({tuple(shapes[k]) for k in keys}) == 1, name
        assert tuple(params[name].shape) == (len(keys), *shapes[keys[0]]), name
        assert str(params[name].dtype) == dtype, name
        # a source is a parameter of the build in one place only: stacked, never also on its own
        assert not set(keys) & set(params), name
    pre = "blocks.1.att."
    # The kernels index the stack by Attention.GROUPS: the time-mix lerps in mixes() order (k, v, r, g)
    # and the weights the same, so lerp g feeds weight g.
    assert groups[pre + "rkvg_weight"] == [pre + f"{n}.weight" for n in ("key", "value", "receptance", "gate")]
    assert groups[pre + "rkvg_mix"] == [pre + f"time_mix_{n}" for n in ("k", "v", "r", "g")]
    assert Attention.GROUPS == ("key", "value", "receptance", "gate")
    assert "blocks.1.ffn.kr_mix" not in groups  # the FFN's lerps stay separate (the LayerNorm+mix kernel was slower)
    # every checkpoint tensor but the stacked ones is still a parameter of its own
    stacked = {k for keys in groups.values() for k in keys}
    assert (set(params) - set(groups)) | stacked == set(shapes)
