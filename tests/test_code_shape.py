"""Code shape: no function in the library or the scripts' modules longer than 60 lines (docstring included).

Long functions are where flags get tested inside loops and stages blur into each other; the generation loop
reads as a list of stages because each stage is short. The argument parser's table of flags is exempt:
it is one line a flag.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MAX_LINES = 60
EXEMPT = {("optimizedSD/arguments.py", "build_parser")}


def test_no_function_is_longer_than_60_lines():
    long = []
    for folder in ("ldm", "optimizedSD"):
        for path in sorted((REPO / folder).rglob("*.py")):
            relative = path.relative_to(REPO).as_posix()
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > MAX_LINES and (relative, node.name) not in EXEMPT:
                        long.append(f"{relative}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "functions over 60 lines: " + "; ".join(long)
