"""Quantisation bugs: the quant family of the bug zoo (catalogue entries; no TVM import here).

Their compiled models live in parity/mutants/quant_models.py. Each is a quantised build (``dtype``
is its scheme, parity/compiled/dtypes.py) whose dequantisation kernel has one indexing mistake of
the kind a hand-written int8 / 4-bit kernel makes. It is judged as every quantised backend is —
replayed by the reference with the same codes, in the scheme's activation dtype — so what it must
show is error beyond a correct port of the same scheme, at the first matmul the kernel feeds.
"""

from __future__ import annotations

from parity.mutants.base import Mutant, _same

QUANT_CATALOGUE: dict[str, Mutant] = {
    m.name: m
    for m in [
        # Square matrices only (in = out), where both index orders are in bounds: att.receptance is
        # layer 0's first matmul in RWKV-5. ry and rx are different vectors (each row's and column's
        # range), so every weight moves by their ratio, not by a rounding.
        Mutant("int8-scales-swapped", "compiled",
               "fp16i8 build whose int8 dequantisation indexes the row scale by output and the column "
               "scale by input (ry[o] * rx[i] for ry[i] * rx[o]) in every square matmul",
               *_same(0, 0, "L0.att.r"), dtype="fp16i8"),
        # Group g dequantised with group g-1's scale (group 0 keeps its own): the index off by one.
        Mutant("q4-group-off-by-one", "compiled",
               "q4f16_1 build whose 4-bit dequantisation applies group g-1's scale to group g",
               *_same(0, 0, "L0.att.r"), dtype="q4f16_1"),
    ]
}
