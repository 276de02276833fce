"""What the two scripts share: the one UsageError (a bad command-line value or combination)."""
from __future__ import annotations


class UsageError(ValueError):
    """A bad command-line value or combination; the message says what to change."""
