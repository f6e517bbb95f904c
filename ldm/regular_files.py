"""Files the user names (configs, prompts files, init images) must be regular files: a FIFO, a device
(``/dev/zero``) or a directory would hang a read or never end it. One check, one wording, for every caller."""

from __future__ import annotations

import os
import stat
from pathlib import Path


def regular_file_size(path: Path, shown: str, what: str, error: type[Exception], missing: str | None = None) -> int:
    """The size of ``path`` if it is a regular file; otherwise ``error`` with one line naming ``what``
    (``missing``: the wording for a file that does not exist, default ``"<what> not found"``)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise error(f"{missing or what + ' not found'}: {shown}") from None
    except OSError as failure:
        raise error(f"cannot read {what} {shown}: {failure.strerror or failure}") from None
    if not stat.S_ISREG(info.st_mode):
        raise error(f"cannot read {what} {shown}: not a regular file")
    return info.st_size
