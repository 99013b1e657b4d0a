"""The one exception type users see: a short message that says what to do next."""

from __future__ import annotations


class PersonavecError(Exception):
    """An error caused by input or environment, reported on one line by the CLI (no traceback)."""


def as_typed(text: object) -> str:
    """A command-line value in a message as the user typed it: bare, quoted only where a shell would need quotes
    to show it (empty, spaces, quotes), escaped where it holds characters a terminal cannot show."""
    text = str(text)
    if not text.isprintable():
        return ascii(text)
    if text and not any(c.isspace() or c in "'\"\\" for c in text):
        return text
    return f"'{text}'" if "'" not in text else f'"{text}"'


def shown(value: object) -> str:
    """A value in a message as the user wrote it: strings quoted, numbers and None as typed, other things by kind
    (a tensor by its shape) — never a long repr."""
    if isinstance(value, str):
        return f'"{value}"'
    if value is None or isinstance(value, (bool, int, float)):
        return str(value)
    shape = getattr(value, "shape", None)
    kind = {"Tensor": "torch tensor", "ndarray": "NumPy array"}.get(type(value).__name__, type(value).__name__)
    if shape is not None:
        return f"a {kind} of shape [{', '.join(map(str, tuple(shape)))}]"
    if isinstance(value, (list, tuple, dict)) and not value:
        return f"an empty {kind}"
    return f"a {kind}"


def whole(value: object, what: str, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int (a Python or NumPy integer, not a bool or float) in ``low..high``, or one clear line."""
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise PersonavecError(f"{what} must be a whole number (int), not {shown(value)}")
    n = int(value)
    if (low is not None and n < low) or (high is not None and n > high):
        where = f"between {low} and {high}" if low is not None and high is not None else \
            f"at least {low}" if low is not None else f"at most {high}"
        raise PersonavecError(f"{what} must be {where}, not {n}")
    return n


def finite(value: object, what: str) -> float:
    """``value`` as a finite float (an int or float, not a bool or a string), or one clear line."""
    import math
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise PersonavecError(f"{what} must be a number, not {shown(value)}")
    x = float(value)
    if not math.isfinite(x):
        raise PersonavecError(f"{what} must be a finite number, not {x}")
    return x
