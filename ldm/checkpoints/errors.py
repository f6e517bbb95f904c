"""The errors of ``ldm.checkpoints`` that more than one of its modules raises or catches.

:class:`CheckpointError` is the one the rest of the program sees (one line, naming the file); the
refusals are raised inside the unpickler and the zip check, and turned into a ``CheckpointError`` by
``ldm.checkpoints.reader``.
"""

from __future__ import annotations

import pickle

from ldm.errors import UserError
from ldm.messages import one_line

__all__ = ["CheckpointError", "PickleRefused", "RefusedGlobal", "ZipRefused"]


class CheckpointError(UserError):
    """A checkpoint that cannot (or must not) be read; the message is one line and names the file."""

    def __init__(self, message: object) -> None:
        super().__init__(one_line(message))


class PickleRefused(pickle.UnpicklingError):
    """The pickle does something a checkpoint never needs (the message says what); nothing of it ran."""


class RefusedGlobal(PickleRefused):
    """The pickle names a function or class outside the table."""

    def __init__(self, qualified_name: str) -> None:
        super().__init__(f"refused global {qualified_name}")
        self.qualified_name = qualified_name


class ZipRefused(ValueError):
    """The zip container is damaged or crafted; the message says how."""
