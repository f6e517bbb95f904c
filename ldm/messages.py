"""The one gate every user-facing message passes through: one line, no terminal control characters.

Messages quote things a file or a user chose: tensor names, paths, yaml keys, exception texts from
libraries. A tensor named ``"a\\n\\x1b[2J..."`` must neither split an error over several lines nor
clear the user's terminal, so names are shown with Python's escapes (``\\n``, ``\\x1b``) and a
message keeps only its first line.
"""

from __future__ import annotations

__all__ = ["describe_error", "escaped", "one_line"]

MAX_MESSAGE = 400  # characters; a message is a sentence, not a dump
MAX_NAME = 160


def _escape_char(char: str) -> str:
    if char.isprintable() or char == " ":
        return char
    return char.encode("unicode_escape").decode("ascii")  # \n, \x1b, \u202e, ...


def escaped(text: object, limit: int = MAX_NAME) -> str:
    """``text`` with every non-printable character (newline, ESC, bidi controls) escaped, at most
    ``limit`` characters: a longer one loses its middle, so a message keeps its subject and its advice."""
    text = str(text)
    if len(text) > 2 * limit:  # escaping only lengthens: never escape more than can be shown
        text = text[:limit] + text[-limit:]
    shown = "".join(_escape_char(char) for char in text)
    if len(shown) <= limit:
        return shown
    head = (limit - 3) * 2 // 3
    return shown[:head] + "..." + shown[len(shown) - (limit - 3 - head):]


def one_line(text: object, limit: int = MAX_MESSAGE) -> str:
    """The first non-empty line of ``text``, control characters escaped, at most ``limit`` characters."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return escaped(lines[0] if lines else "", limit)


def describe_error(error: BaseException) -> str:
    """``"TypeName: first line of the message"``, for wrapping a library's exception in our own one line."""
    detail = one_line(error, 200)
    return f"{type(error).__name__}: {detail}" if detail else type(error).__name__
