"""Delta debugging (Zeller & Hildebrandt, "Simplifying and Isolating Failure-Inducing Input", 2002).

``ddmin`` shrinks a list of candidates to a small subset for which ``still_fails(subset)`` holds, here:
"the run no longer spikes when these documents are dropped from the window" (the question the
exclusion list answers, asked while everything else stays in, so each replayed model stays close to the
real one). It tries each chunk alone, then each complement, and refines the granularity when neither
holds, so two documents that each spike the run on their own are both found. Written here because it is twenty
lines and the known packages wrap it around their own test runners, not around a callable.

Every test result is cached by subset, the order of candidates is kept everywhere, and the budget
(tests and seconds) is checked before each test, so the same inputs always give the same answer
(the time budget aside, which only ever stops the search early and says so).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence


@dataclass
class DDResult:
    candidates: list[str]
    tests: int  # calls of still_fails that ran (cache hits excluded)
    history: list[dict] = field(default_factory=list)  # each test: subset size, whether it held
    stopped: str = "minimal"  # minimal | min_candidates | max_tests | max_seconds


def _chunks(items: list, n: int) -> list[list]:
    size, extra = divmod(len(items), n)
    out, pos = [], 0
    for i in range(n):
        step = size + (1 if i < extra else 0)
        out.append(items[pos:pos + step])
        pos += step
    return [c for c in out if c]


def ddmin(candidates: Sequence[str], still_fails: Callable[[list[str]], bool], *, min_candidates: int = 1,
          max_tests: int = 32, max_seconds: float = float("inf")) -> DDResult:
    """Shrink ``candidates`` (already known to fail as a whole) to a 1-minimal failing subset, within budget."""
    cands = list(candidates)
    cache: dict[frozenset, bool] = {frozenset(cands): True}
    res = DDResult(cands, 0)
    started = time.monotonic()

    def test(subset: list[str]) -> bool | None:
        key = frozenset(subset)
        if key in cache:
            return cache[key]
        if res.tests >= max_tests:
            res.stopped = "max_tests"
            return None
        if time.monotonic() - started >= max_seconds:
            res.stopped = "max_seconds"
            return None
        res.tests += 1
        cache[key] = bool(still_fails(list(subset)))
        res.history.append({"size": len(subset), "holds": cache[key]})
        return cache[key]

    n = 2
    while len(cands) > min_candidates:
        chunks = _chunks(cands, min(n, len(cands)))
        reduced = False
        for chunk in chunks:  # does one chunk alone reproduce it?
            outcome = test(chunk)
            if outcome is None:
                res.candidates = cands
                return res
            if outcome:
                cands, n, reduced = chunk, 2, True
                break
        if not reduced and len(chunks) > 2:  # does dropping one chunk keep it?
            for chunk in chunks:
                rest = [c for c in cands if c not in chunk]
                outcome = test(rest)
                if outcome is None:
                    res.candidates = cands
                    return res
                if outcome:
                    cands, n, reduced = rest, max(n - 1, 2), True
                    break
        if not reduced:
            if n >= len(cands):
                res.stopped = "minimal"
                break
            n = min(2 * n, len(cands))
    else:
        res.stopped = "min_candidates"
    res.candidates = cands
    return res
