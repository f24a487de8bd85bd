"""Bounties from files: a JSONL import (one bounty per line), and demo bounties derived from real functions.

A derived bounty is a held-out Python function with a docstring: instruction = its signature and
docstring (what a user would write as a request), solution = its body. They are marked ``derived`` in
``source`` so they are never mistaken for user-written ones.
"""

from __future__ import annotations

import ast
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

FIELDS = ("title", "instruction", "language", "solution")
MAX_LEN = {"title": 256, "instruction": 20_000, "language": 32, "solution": 50_000}


@dataclass(frozen=True)
class BountyRecord:
    title: str
    instruction: str
    language: str
    solution: str

    def as_dict(self) -> dict[str, str]:
        return {f: getattr(self, f) for f in FIELDS}


def parse_line(line: str) -> BountyRecord:
    """One JSONL line → a bounty; raises ValueError with the reason."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"malformed JSON ({exc.msg})") from None
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    missing = [f for f in FIELDS if not isinstance(obj.get(f), str) or not obj[f].strip()]
    if missing:
        raise ValueError(f"missing or empty field(s): {', '.join(missing)}")
    too_long = [f for f in FIELDS if len(obj[f]) > MAX_LEN[f]]
    if too_long:
        raise ValueError(f"field(s) too long: {', '.join(too_long)}")
    return BountyRecord(*(obj[f] for f in FIELDS))


def read_jsonl(path: str | Path) -> tuple[list[BountyRecord], Counter, list[str]]:
    """Valid bounties, counts of skipped lines by reason, and the first few errors with line numbers."""
    good, skipped, errors = [], Counter(), []
    with Path(path).open(encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                good.append(parse_line(line))
            except ValueError as exc:
                reason = str(exc).split(" (")[0].split(":")[0]
                skipped[reason] += 1
                if len(errors) < 5:
                    errors.append(f"{path}:{n}: {exc}")
    return good, skipped, errors


def _docstring_functions(tree: ast.AST) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and ast.get_docstring(node) and node.body:
            yield node


def derive(path: str, content: str, min_body_lines: int = 2, max_body_lines: int = 40) -> list[BountyRecord]:
    """Bounties from the documented functions of one Python file (none if it does not parse)."""
    try:
        tree = ast.parse(content)
    except (SyntaxError, ValueError):
        return []
    lines = content.split("\n")
    out = []
    for fn in _docstring_functions(tree):
        doc_node = fn.body[0]
        rest = fn.body[1:]
        if not rest or fn.end_lineno is None or doc_node.end_lineno is None:
            continue
        start = min([d.lineno for d in fn.decorator_list] + [fn.lineno]) - 1
        instruction = "\n".join(lines[start:doc_node.end_lineno])
        body = "\n".join(lines[doc_node.end_lineno:fn.end_lineno])
        n_body = sum(1 for ln in body.split("\n") if ln.strip())
        if not (min_body_lines <= n_body <= max_body_lines):
            continue
        out.append(BountyRecord(f"{path}:{fn.name}", instruction, "python", body + "\n"))
    return out
