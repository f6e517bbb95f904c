"""The errors that several modules of :mod:`ldm.control` raise."""

from __future__ import annotations

from ldm.errors import UserError
from ldm.messages import one_line


class ControlFileError(UserError):
    """A ``--control_model`` that is not an SD v1 ControlNet, or cannot be read; one line naming the file."""

    def __init__(self, message: object) -> None:
        super().__init__(one_line(message))
