"""Reading metric values out of a result dict, shared by every renderer (HTML, Markdown, CSV)."""

from __future__ import annotations

import math
from typing import Any


def metric_value(value: Any) -> float | None:
    """A metric as a float; the engine writes inf/nan as strings so its JSON stays strict."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def format_number(value: float, *, digits: int = 3) -> str:
    """``nan``, ``inf``/``-inf`` or ``digits`` significant digits: the same text in every report."""
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.{digits}g}"
