"""Porting bugs injected into the torch reference — the bug in the engineer's own copy."""

from __future__ import annotations

import torch

from parity.reference.rwkv5 import RWKV5Reference


class ReferenceSigmoidOnR(RWKV5Reference):
    def _receptance(self, xr, p):
        return torch.sigmoid(super()._receptance(xr, p))  # BUG: v4's sigmoid carried into v5


REFERENCES = {"reference-sigmoid-r": ReferenceSigmoidOnR}
