"""Precision bugs: the precision family of the bug zoo (catalogue entries; no TVM import here).

Their compiled models live in parity/mutants/precision_models.py; the entries join ``CATALOGUE``.
"""

from __future__ import annotations

from parity.mutants import Mutant

PRECISION_CATALOGUE: dict[str, Mutant] = {}
