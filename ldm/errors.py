"""The base class of every error the user can fix (a bad flag, a missing or broken file, an unwritable
folder): the scripts print it as one line on stderr and exit with code 2, never a traceback. The errors that
modules of several packages raise live here (``UsageError`` for what the user handed in, ``ConfigError`` for
a model config); each package keeps its own shared ones in its ``errors.py`` (``ldm.checkpoints.errors``:
``CheckpointError``; ``ldm.conditioning.errors``: ``PromptError``; ``ldm.loading.errors``: ``LoraError``)."""

from __future__ import annotations

from ldm.messages import one_line


class UserError(Exception):
    """Input the user can fix; the message is one line and names what to change."""


class UsageError(UserError, ValueError):
    """Bad command-line input (a flag, a prompt, an image or mask handed in); one line and exit code 2."""


class ConfigError(UserError, ValueError):
    """A model config that cannot be read or does not describe an SD v1-style model (one line)."""

    def __init__(self, message: object) -> None:
        super().__init__(one_line(message))
