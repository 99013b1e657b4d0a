"""How the report shows numbers: missing, NaN and infinite values as "–", fixed digits, no "nan" anywhere."""

from __future__ import annotations

import json
import math
from typing import Any

DASH = "–"


def number(x: Any) -> float | None:
    """A finite float, or None for None / NaN / inf / non-numbers."""
    if x is None or isinstance(x, bool):
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def fixed(x: Any, digits: int = 2) -> str:
    v = number(x)
    return DASH if v is None else f"{v:.{digits}f}"


def with_interval(x: Any, interval: Any, digits: int = 3) -> str:
    """``x`` and its 95 % interval ``[lo, hi]`` (left out where there is none): ``0.512 [0.40, 0.61]``."""
    lo, hi = [*interval, None, None][:2] if isinstance(interval, (list, tuple)) else (None, None)
    if number(lo) is None or number(hi) is None:
        return fixed(x, digits)
    return f"{fixed(x, digits)} [{fixed(lo, 2)}, {fixed(hi, 2)}]"


def integer(x: Any) -> str:
    v = number(x)
    return DASH if v is None else str(round(v))


def coef(x: Any) -> str:
    v = number(x)
    return DASH if v is None else f"{v:g}"


def value(x: Any) -> str:
    """Any summary value as display text (escaped later, by the template)."""
    if x is None:
        return DASH
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        return fixed(x, 4).rstrip("0").rstrip(".") if number(x) is not None else DASH
    if isinstance(x, (list, dict)):
        return json.dumps(x, allow_nan=True, default=str).replace("NaN", DASH)
    return str(x)
