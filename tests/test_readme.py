"""The README stays true: its flag table lists every flag the scripts take, and nothing they do not."""

from __future__ import annotations

import re
from pathlib import Path

from ldm.pipeline.request import IMG2IMG, INPAINT, TXT2IMG
from optimizedSD.arguments import build_parser

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_flag_table_lists_every_flag_of_the_scripts():
    text = README.read_text(encoding="utf-8")
    table = text[text.index("## Flags"):text.index("## Weighted prompts")]
    documented = set(re.findall(r"^\| `(--[\w-]+)", table, flags=re.M))
    documented |= set(re.findall(r"^\| `--[\w-]+`, `(--[\w-]+)", table, flags=re.M))  # "`--H`, `--W`"
    flags = set()
    for mode in (TXT2IMG, IMG2IMG, INPAINT):
        for action in build_parser(mode)._actions:
            flags |= {f for f in action.option_strings if f.startswith("--") and f != "--help"}
    assert flags - documented == set(), "flags missing from the README's table"
    assert documented - flags == set(), "the README's table lists flags the scripts do not take"
