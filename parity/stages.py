"""Canonical stage names (docs/RWKV.md §2) and their execution order.

Every backend records under these names, so two dumps line up without any mapping at compare
time. Pure Python: the compare engine imports this, and it must not pull in torch or tvm.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Per-layer stages in the order one step executes them. xg / g exist only for gated versions
# (5.1, 5.2); ln_x only for v5; gated (what att.output multiplies) is ln_x·g in 5.1/5.2, r·wkv
# in v4, and absent in 5.0, where att.output takes ln_x itself.
_ATT_STAGES = ("ln1", "shift", "xk", "xv", "xr", "xg", "r", "k", "v", "g", "wkv", "ln_x", "gated", "out")
_FFN_STAGES = ("ln2", "shift", "xk", "xr", "r", "k", "out")
_NOT_IN = {
    "4": {"xg", "g", "ln_x"},
    "5.0": {"xg", "g", "gated"},
    "5.1": set(),
    "5.2": set(),
}
VERSIONS = tuple(_NOT_IN)

# Where a layer goes on from a value handed in rather than its own (the reference's
# ``layer(splice=...)``): the scan's inputs r, k, v and its output wkv. The replay (parity/dumpers/
# replay.py) hands in the candidate's own, so each stage there is judged on exactly the inputs the
# candidate gave it — the scan by its own sums, GroupNorm by its own statistics. Why: GroupNorm
# divides each head by that head's own spread, so a wkv that differs from the candidate's within
# the wkv record's allowance (a share of max|wkv| over all heads) reaches ln_x multiplied by
# max|wkv| / the std of a head that nearly cancels. A correct tvm@fp16 at the 0.4B shape (random:16:3
# + 4 steps), replayed whole-layer, showed 1.73x its allowance at L2.att.gated; with the splice 0.1x.
# And a scan bug hides no more in r, k, v's fp16 rounding: decay kept in bf16 (the precision zoo)
# shows at att.wkv, 3.1x, where a correct fp16 build's scan stays under 0.06x (rwkv5_2-L4 fixture).
# RWKV-4 has no GroupNorm and takes no splice.
SPLICE_STAGES = ("att.r", "att.k", "att.v", "att.wkv")

# Recurrent state per layer, by family: v5 keeps the wkv matrix, v4 the stable (aa, bb, pp) triple.
V5_STATE_SLOTS = ("att_x", "att_kv", "ffn_x")
V4_STATE_SLOTS = ("att_x", "aa", "bb", "pp", "ffn_x")


def state_slots(version: str) -> tuple[str, ...]:
    return V4_STATE_SLOTS if version == "4" else V5_STATE_SLOTS

_LAYER_RE = re.compile(r"^(?:state\.)?L(\d+)\.")


@dataclass(frozen=True)
class StageInfo:
    """What a stage name says about itself."""

    name: str
    layer: int | None  # None for emb, ln_out, logits
    per_token: bool  # True: leading axis is the token row (T rows in prefill); False: a state slot


def layer_stage_names(*, layer: int, version: str = "5.2") -> list[str]:
    if version not in _NOT_IN:
        raise ValueError(f"unknown RWKV version {version!r}")
    names = [f"L{layer}.att.{s}" for s in _ATT_STAGES if s not in _NOT_IN[version]]
    names.append(f"L{layer}.x_after_att")
    names += [f"L{layer}.ffn.{s}" for s in _FFN_STAGES]
    names.append(f"L{layer}.x_out")
    return names


def state_stage_names(*, n_layer: int, slots: tuple[str, ...] = V5_STATE_SLOTS) -> list[str]:
    return [f"state.L{layer}.{slot}" for layer in range(n_layer) for slot in slots]


def stage_order(*, n_layer: int, version: str = "5.2") -> list[str]:
    """Every canonical stage of one step, in execution order; the state after the step comes last."""
    names = ["emb"]
    for layer in range(n_layer):
        names += layer_stage_names(layer=layer, version=version)
    names += ["ln_out", "logits"]
    names += state_stage_names(n_layer=n_layer, slots=state_slots(version))
    return names


def stage_info(name: str) -> StageInfo:
    m = _LAYER_RE.match(name)
    layer = int(m.group(1)) if m else None
    return StageInfo(name=name, layer=layer, per_token=not name.startswith("state."))


def short_stage(name: str) -> str:
    """The stage without its layer prefix ("L3.att.wkv" -> "att.wkv"), for heat-map columns."""
    return _LAYER_RE.sub("", name)
