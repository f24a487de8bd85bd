"""A labelled near-duplicate set built from real code, and how well a clustering recovers it.

An evaluation harness, not a pipeline stage (so it lives beside the benchmarks, not in pipeline/data/): shared
by the tests (precision/recall floors) and benchmarks/bench_data.py (F1 next to datasketch).
Every originals is a real standard-library file; its variants are what near dedup exists to catch:

- ``rename``: a few identifiers (functions, arguments, assigned names) renamed everywhere;
- ``reformat``: re-indented with 2 spaces, CRLF line endings, trailing blanks, extra blank lines
  (never an exact duplicate, since indentation is kept by exact dedup's normalisation);
- ``edit``: a few short runs of lines deleted and comment lines inserted;
- ``mixed``: all of the above at once.

Negatives are distinct files that share boilerplate: each gets the same licence header and import
block, the situation where a too-eager dedup would merge unrelated files. Hard negatives (``overlap``)
splice the first part of one original onto the end of another, so they share a large block of code
with both (true Jaccard 0.3-0.6): related, but below the threshold, where raw LSH starts to let pairs in. Files are chosen so that no
two originals are themselves near duplicates (the stdlib has some, e.g. ``encodings/cp*.py``).
"""

from __future__ import annotations

import ast
import builtins
import keyword
import os
import random
import re
import sysconfig
from dataclasses import dataclass, field
from math import comb
from pathlib import Path

from pipeline.data.minhash import token_regex

LICENCE_HEADER = '''\
# Copyright 2024 The Example Authors. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Part of the example package."""

from __future__ import annotations

import os
import re
import sys
from typing import Any, Iterable, Optional
'''
VARIANTS = ("rename", "reformat", "edit", "mixed")
# Originals that overlap this much with one already chosen are skipped (true shingle Jaccard).
MAX_OVERLAP = 0.3


@dataclass
class LabelledSet:
    names: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    groups: list[int] = field(default_factory=list)  # ground truth: same group = near duplicates
    kinds: list[str] = field(default_factory=list)  # "original", a variant name, or "boilerplate"

    def add(self, name: str, text: str, group: int, kind: str) -> None:
        self.names.append(name)
        self.texts.append(text)
        self.groups.append(group)
        self.kinds.append(kind)


def shingle_set(text: str, ngram: int = 5, token_pattern: str = r"[A-Za-z_0-9]+") -> set[tuple[str, ...]]:
    """Exact (unhashed) shingle set: the ground truth the MinHash estimate approximates."""
    toks = token_regex(token_pattern).findall(text)
    n = min(ngram, len(toks))
    return {tuple(toks[i:i + n]) for i in range(len(toks) - n + 1)} if toks else set()


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


# -------------------------------------------------------------------------------------- variants
def _renameable(text: str) -> list[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
    reserved = set(keyword.kwlist) | set(dir(builtins)) | {"self", "cls"}
    return sorted(n for n in names if len(n) >= 4 and n not in reserved and not n.startswith("__"))


def rename(text: str, rng: random.Random, k: int = 3, max_share: float = 0.01) -> str:
    """Rename ``k`` identifiers, each at most ``max_share`` of the tokens (a helper, not ``self``)."""
    tokens = token_regex(r"[A-Za-z_0-9]+").findall(text)
    counts = {t: 0 for t in tokens}
    for t in tokens:
        counts[t] += 1
    names = [n for n in _renameable(text) if counts.get(n, 0) <= max_share * len(tokens)]
    for name in rng.sample(names, min(k, len(names))):
        text = re.sub(rf"\b{re.escape(name)}\b", f"{name}_renamed", text)
    return text


def reformat(text: str, rng: random.Random) -> str:
    out = []
    for line in text.split("\n"):
        stripped = line.lstrip(" ")
        depth = (len(line) - len(stripped)) // 4
        line = "  " * depth + " " * ((len(line) - len(stripped)) % 4) + stripped
        out.append(line + ("  " if rng.random() < 0.2 else ""))
        if not stripped and rng.random() < 0.3:
            out.append("")
    return "\r\n".join(out)


def edit(text: str, rng: random.Random, cuts: int = 3, max_cut: int = 4) -> str:
    lines = text.split("\n")
    for _ in range(cuts):
        if len(lines) < 20:
            break
        start = rng.randrange(len(lines) - max_cut)
        del lines[start:start + rng.randint(1, max_cut)]
    for _ in range(2):
        at = rng.randrange(len(lines))
        lines.insert(at, " " * (len(lines[at]) - len(lines[at].lstrip())) + "# NOTE: reviewed, see issue tracker")
    return "\n".join(lines)


def make_variant(text: str, kind: str, rng: random.Random) -> str:
    if kind == "rename":
        return rename(text, rng)
    if kind == "reformat":
        return reformat(text, rng)
    if kind == "edit":
        return edit(text, rng)
    return reformat(edit(rename(text, rng, k=2), rng, cuts=2), rng)


# ------------------------------------------------------------------------------------------ set
SKIP_DIRS = {"site-packages", "test", "tests", "idle_test", "encodings", "lib2to3", "__pycache__"}


def candidate_files(stdlib: Path, min_bytes: int, max_bytes: int) -> list[Path]:
    """Standard-library modules of a useful size, skipping tests, vendored code and generated codecs."""
    out = []
    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if name.endswith(".py") and not p.is_symlink() and min_bytes <= p.stat().st_size <= max_bytes:
                out.append(p)
    return sorted(out)


def _pick(files: list[Path], n: int, rng: random.Random, chosen: list[set], stdlib: Path) -> list[tuple[str, str]]:
    picked = []
    for p in rng.sample(files, len(files)):
        if len(picked) == n:
            break
        try:
            text = p.read_text(encoding="utf-8")
            ast.parse(text)
        except (UnicodeDecodeError, SyntaxError, ValueError):
            continue
        sh = shingle_set(text)
        if len(sh) < 200 or any(jaccard(sh, other) > MAX_OVERLAP for other in chosen):
            continue
        chosen.append(sh)
        picked.append((p.relative_to(stdlib).as_posix(), text))
    if len(picked) < n:
        raise ValueError(f"only {len(picked)} usable files for {n} requested under {stdlib}")
    return picked


def splice(a: str, b: str, frac: float) -> str:
    """The first ``frac`` of ``a``'s lines followed by the last ``1 - frac`` of ``b``'s."""
    la, lb = a.split("\n"), b.split("\n")
    return "\n".join(la[: int(len(la) * frac)] + lb[int(len(lb) * frac):])


def overlaps(originals: list[tuple[str, str]], n: int, rng: random.Random) -> list[tuple[str, str]]:
    """Up to ``n`` spliced files whose true Jaccard with every original lies in [0.3, 0.6]."""
    sets = [shingle_set(t) for _, t in originals]
    out = []
    for k in rng.sample(range(len(originals)), len(originals)):
        if len(out) == n:
            break
        (name_a, a), (name_b, b) = originals[k], originals[(k + 1) % len(originals)]
        text = splice(a, b, rng.uniform(0.55, 0.7))
        js = [jaccard(shingle_set(text), other) for other in sets]
        if 0.3 <= max(js) <= 0.6:
            out.append((f"{name_a}+{name_b}#overlap", text))
    return out


def build_neardup_set(n_originals: int = 30, n_boilerplate: int = 30, seed: int = 0,
                      stdlib: str | Path | None = None, n_overlap: int | None = None) -> LabelledSet:
    """Originals with their four variants each, distinct files sharing a licence and import header, and
    spliced hard negatives (``n_overlap``, default half the originals)."""
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    rng = random.Random(seed)
    chosen: list[set] = []
    files = candidate_files(root, 2_000, 30_000)
    originals = _pick([p for p in files if p.stat().st_size >= 3_000], n_originals, rng, chosen, root)
    distinct = _pick([p for p in files if p.stat().st_size <= 12_000], n_boilerplate, rng, chosen, root)
    out = LabelledSet()
    for g, (name, text) in enumerate(originals):
        out.add(name, text, g, "original")
        for kind in VARIANTS:
            out.add(f"{name}#{kind}", make_variant(text, kind, random.Random(f"{seed}:{name}:{kind}")), g, kind)
    for k, (name, text) in enumerate(distinct):
        out.add(f"{name}#boilerplate", LICENCE_HEADER + "\n\n" + text, len(originals) + k, "boilerplate")
    n_overlap = n_originals // 2 if n_overlap is None else n_overlap
    for k, (name, text) in enumerate(overlaps(originals, n_overlap, rng)):
        out.add(name, text, len(originals) + len(distinct) + k, "overlap")
    return out


# -------------------------------------------------------------------------------------- scoring
def pairwise_scores(predicted: list, truth: list) -> dict[str, float]:
    """Precision, recall and F1 over pairs of documents: a pair is positive when both are in one cluster.

    This scores clusters, not single decisions, so a transitive merge of two unrelated groups costs
    precision and a group split in two costs recall.
    """
    if len(predicted) != len(truth):
        raise ValueError(f"{len(predicted)} predicted labels for {len(truth)} documents")

    def pairs(counts: dict) -> int:
        return sum(comb(c, 2) for c in counts.values())

    def count(keys) -> dict:
        out: dict = {}
        for k in keys:
            out[k] = out.get(k, 0) + 1
        return out

    tp = pairs(count(zip(predicted, truth)))
    pred = pairs(count(predicted))
    true = pairs(count(truth))
    precision = tp / pred if pred else 1.0
    recall = tp / true if true else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "true_pairs": true, "predicted_pairs": pred}
