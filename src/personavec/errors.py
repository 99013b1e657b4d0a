"""The one exception type users see: a short message that says what to do next."""

from __future__ import annotations


class PersonavecError(Exception):
    """An error caused by input or environment, reported on one line by the CLI (no traceback)."""
