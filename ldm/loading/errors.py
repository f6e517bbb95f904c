"""Errors of building the models from files, shared by the LoRA reader and its callers."""

from __future__ import annotations

from ldm.checkpoints.errors import CheckpointError


class LoraError(CheckpointError):
    """A LoRA file that cannot be used; the message is one line and names the file."""
