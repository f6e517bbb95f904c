"""Errors of turning prompts into conditioning, shared by the syntaxes, the encoder and the prompts file."""

from __future__ import annotations

from ldm.errors import UserError


class PromptError(UserError, ValueError):
    """A prompt or prompts file the generator cannot use (reported to the user in one line)."""
