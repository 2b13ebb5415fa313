"""User-facing errors.

Every problem a user can cause (bad config, bad data, bad adapter) raises a
:class:`PeftlabError`. The CLI prints its message and hint and exits non-zero
without a traceback; the Python API lets it propagate.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class PeftlabError(Exception):
    """A problem with the user's input, with a hint on how to fix it."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class ConfigError(PeftlabError):
    """The run configuration is invalid."""


class DataError(PeftlabError):
    """The dataset is missing, unreadable or does not match the configuration."""


class AdapterError(PeftlabError):
    """An adapter directory is missing files, corrupted, or made for another model."""


class MethodError(PeftlabError):
    """A PEFT method is unknown or does not fit the task or architecture."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return ' (did you mean "x"?)' for the closest choice, or '' if none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f' (did you mean "{close[0]}"?)' if close else ""


def listed(items: list[str], limit: int = 3) -> str:
    """The first ``limit`` items, comma-separated, and how many more there are (for messages)."""
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")
