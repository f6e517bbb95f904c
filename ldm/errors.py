"""The one base class of every error the user can fix (a bad flag, a missing or broken file, an unwritable
folder): the scripts print it as one line on stderr and exit with code 2, never a traceback. Each module
raises its own subclass where the cause lives (``CheckpointError`` in the reader, ``ConfigError`` in the
config parser, ``PromptError``, ``OutputError``, ``UsageError`` for flags)."""

from __future__ import annotations


class UserError(Exception):
    """Input the user can fix; the message is one line and names what to change."""


class UsageError(UserError, ValueError):
    """Bad command-line input (a flag, a prompt, an image or mask handed in); one line and exit code 2."""
