"""The errors the CLI reports without a traceback: each message names the file, field or value at fault
and says what to do. Exit codes: 2 for bad input (``ConfigError``, any ``ValueError``); 1 for a run that
stopped although its input is fine (``NonFiniteLossError``, ``TeacherServerError``: rerunning continues it)
and for ``distill generate`` when no sample was kept."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config problem the user must fix; the message names the file and field."""


class NonFiniteLossError(RuntimeError):
    """Training produced a non-finite loss; the message diagnoses the cause and names the last good
    checkpoint (nothing was written for the failing step)."""


class TeacherServerError(RuntimeError):
    """A teacher server cannot be used (down, answering garbage, not deterministic); the message names the
    URL and what to do."""
