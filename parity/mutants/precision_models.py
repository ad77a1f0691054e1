"""Precision bugs injected into the TVM model (the precision mutants of parity/mutants/precision.py).

Kept apart from compiled.py so the families grow independently; ``model_class`` looks here.
"""

from __future__ import annotations

MODELS: dict = {}
