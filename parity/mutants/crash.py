"""Crashes and hangs: the crash family of the bug zoo (catalogue entries; no TVM import here).

Their compiled models live in parity/mutants/crash_models.py; the entries join ``CATALOGUE``.
"""

from __future__ import annotations

from parity.mutants import Mutant

CRASH_CATALOGUE: dict[str, Mutant] = {}
