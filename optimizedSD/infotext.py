"""AUTOMATIC1111's infotext read back from images (``--from_png``), and the EXIF that carries it in JPEGs.

The infotext is the text the webui (and this tool) stores with an image::

    <prompt, possibly several lines>
    Negative prompt: <negative prompt, possibly several lines>
    Steps: 20, Sampler: Euler a, Schedule type: Uniform, CFG scale: 7.0, Seed: 1, Size: 512x512, ...

It is parsed as the webui's ``infotext_utils.parse_generation_parameters`` does: the last line holds the
``key: value`` pairs when at least three of them are found there (values holding a comma, colon or
newline are JSON-quoted); lines up to one starting with ``Negative prompt:`` are the prompt.

In a PNG it is the ``tEXt`` chunk ``parameters``; in a JPEG it is the EXIF UserComment, which must be
of type UNDEFINED (7): Pillow writes ``bytes`` as type BYTE, and piexif (the webui's reader) then hands
back a tuple that its ``UserComment.load`` cannot decode. :func:`user_comment_exif` writes the EXIF block
itself for that reason.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass

from PIL import Image

PARAMETERS_KEY = "parameters"
EXIF_IFD_POINTER = 0x8769
USER_COMMENT = 0x9286
_UNICODE_CODE = b"UNICODE\0"  # EXIF character codes (8 bytes) before the comment itself
_ASCII_CODE = b"ASCII\0\0\0"
MAX_EXIF_BYTES = 65533 - 2  # one JPEG APP1 segment

# "key: value" pairs of the last line: a key starts with a word character and holds words, spaces, "-" and
# "/"; a value is a JSON string or runs to the next comma.
_PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_NEGATIVE = "Negative prompt:"


@dataclass(frozen=True)
class Infotext:
    """An image's generation parameters: the prompts, and the other fields as written (``"Steps": "20"``)."""

    prompt: str
    negative_prompt: str
    fields: dict[str, str]


def _unquote(value: str) -> str:
    if len(value) < 2 or value[0] != '"' or value[-1] != '"':
        return value
    try:
        return str(json.loads(value))
    except ValueError:
        return value


def parse_infotext(text: str) -> Infotext:
    """Split an infotext into prompt, negative prompt and fields (see the module docstring)."""
    *lines, last = text.strip().split("\n")
    if len(_PAIR.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt = negative = ""
    in_negative = False
    for line in lines:
        line = line.strip()
        if line.startswith(_NEGATIVE):
            in_negative = True
            line = line[len(_NEGATIVE):].strip()
        if in_negative:  # an empty text so far takes the line without a newline, as the webui joins them
            negative += ("\n" if negative else "") + line
        else:
            prompt += ("\n" if prompt else "") + line
    fields = {key: _unquote(value) for key, value in _PAIR.findall(last)}
    return Infotext(prompt, negative, fields)


def read_parameters(path: str | os.PathLike[str]) -> str | None:
    """The infotext stored in a PNG (``parameters`` chunk) or JPEG/WebP (EXIF UserComment); None if absent."""
    with Image.open(path) as image:
        text = image.info.get(PARAMETERS_KEY)
        if isinstance(text, str):
            return text
        comment = image.getexif().get_ifd(EXIF_IFD_POINTER).get(USER_COMMENT)
    if comment is None:
        return None
    if isinstance(comment, tuple):  # written as type BYTE (Pillow's default for bytes)
        comment = bytes(comment)
    if isinstance(comment, str):
        return comment
    return decode_user_comment(comment)


def decode_user_comment(comment: bytes) -> str:
    """An EXIF UserComment's text, by its 8-byte character code (UNICODE is UTF-16, big-endian as the webui writes)."""
    code, body = comment[:8], comment[8:]
    if code == _UNICODE_CODE:
        if body[:2] in (b"\xff\xfe", b"\xfe\xff"):
            return body.decode("utf-16")
        return body.decode("utf-16-be", "replace")
    if code == _ASCII_CODE:
        return body.decode("ascii", "replace")
    return (body if code == b"\0" * 8 else comment).decode("utf-8", "replace")


def user_comment_exif(text: str) -> bytes:
    """An EXIF block (for ``Image.save(..., exif=...)``) holding only ``text`` as UserComment, type UNDEFINED.

    Big-endian TIFF: IFD0 with the Exif-IFD pointer, the Exif IFD with UserComment, then the comment
    (``UNICODE\\0`` + UTF-16BE, as piexif's ``UserComment.dump(text, encoding="unicode")``).
    Raises ValueError when the text does not fit one JPEG APP1 segment.
    """
    comment = _UNICODE_CODE + text.encode("utf-16-be")
    exif_ifd_offset = 8 + 2 + 12 + 4  # header, IFD0 (one entry, next-IFD offset)
    comment_offset = exif_ifd_offset + 2 + 12 + 4
    tiff = b"".join([
        b"MM\x00\x2a" + struct.pack(">I", 8),
        struct.pack(">H", 1) + struct.pack(">HHII", EXIF_IFD_POINTER, 4, 1, exif_ifd_offset) + struct.pack(">I", 0),
        struct.pack(">H", 1) + struct.pack(">HHII", USER_COMMENT, 7, len(comment), comment_offset) + struct.pack(">I", 0),
        comment,
    ])
    block = b"Exif\0\0" + tiff
    if len(block) > MAX_EXIF_BYTES:
        raise ValueError(f"the parameters text ({len(text)} characters) is too long for a JPEG's EXIF block")
    return block
