"""Crashes and hangs injected into the TVM model (the crash mutants of parity/mutants/crash.py).

Kept apart from compiled.py so the families grow independently; ``model_class`` looks here.
"""

from __future__ import annotations

MODELS: dict = {}
