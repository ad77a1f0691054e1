"""Precision bugs: the precision family of the bug zoo (catalogue entries; no TVM import here).

Their compiled models live in parity/mutants/precision_models.py; the entries join ``CATALOGUE``.
Each is a low-precision build (``dtype``) with one of docs/RWKV.md §3's traps put back; it is judged
as every backend of its dtype is — replayed by the reference in that dtype, with that dtype's
tolerance — so what it must show is error beyond a correct port of the same precision.
"""

from __future__ import annotations

from parity.mutants.base import Mutant, _same

# Not a bundled fixture (fixtures/*.pth): made for this trap alone, kept in fixtures/precision/.
HOT_FIXTURE = "precision/rwkv4-L7-C64-hot"

# An isolated run of a low-precision build is judged against the fp32 reference's stages (the
# session compares it with the yardstick's dump), so its first finding carries fp16's own rounding
# of one layer (up to 0.13 x max|b| on ln_x, benchmarks/calibrate_precision.py) as well as the bug.
_ISOLATED_NOTE = ("isolated: judged by the reference in the build's dtype on the yardstick's inputs "
                  "(session._own_errors), so fp16's own rounding is no error there",)




PRECISION_CATALOGUE: dict[str, Mutant] = {
    m.name: m
    for m in [
        # The scan is judged on the build's own r, k, v (the replay, and the isolated judge, splice them
        # in: parity.stages.SPLICE_STAGES) at fp32's precision (tolerance.spliced_scan_tolerance), so the
        # decay error shows in the scan's output, where the bug is; judged on its own r, k, v the judge's
        # scan hid it inside fp16's allowance, and GroupNorm showed it first, at ln_x.
        Mutant("decay-in-bf16", "compiled",
               "fp16 build whose decay w = exp(-exp(time_decay)) is kept in bf16 (w near 1 rounds to 1.0)",
               *_same(0, 0, "L0.att.wkv"), dtype="float16", notes=_ISOLATED_NOTE),
        # Layer 0's heads are well spread on this fixture (E[x^2] and E[x]^2 differ in their top bits);
        # layer 1 has heads whose |mean| dwarfs their spread: 29% of ln_x wrong there, 118x the allowance.
        Mutant("groupnorm-variance-fp16", "compiled",
               "fp16 build whose ln_x variance is E[x^2] - E[x]^2 computed in fp16",
               *_same(0, 1, "L1.att.ln_x"), dtype="float16", notes=_ISOLATED_NOTE),
        Mutant("logits-fp16", "compiled", "fp32 build that hands its logits over rounded to fp16",
               *_same(0, None, "logits")),
        # fixtures/precision/rwkv4-L7-C64-hot: layer 6's att.out reaches 94,060 in fp32 (1.44x fp16's
        # largest finite), 47,030 in a rescaled fp16 stream (fixtures/make_fixtures.py); the first
        # Inf is there, in both modes (the isolated layer 6 takes the same finite input of ~6).
        Mutant("rwkv4-fp16-no-rescale", "compiled",
               "fp16 RWKV-4 build without the residual rescale (RESCALE_LAYER 0): the stream overflows to Inf",
               *_same(0, 6, "L6.att.out"), dtype="float16", fixture=HOT_FIXTURE, notes=_ISOLATED_NOTE),
    ]
}
