"""The suggestion filter: a small classifier that decides when to show nothing.

A scikit-learn ``LogisticRegression`` predicts whether a suggestion will be accepted from what a gateway
knows when it has one: the mean token log-probability of the suggestion, its length in characters and
words, the cursor's column (characters of the line before it), whether the suggestion repeats text
already just above the cursor, and the language. The threshold is the one that maximises the expected
utility on its training rows — accepted characters minus ``rlhf.gate.reject_cost_chars`` per suggestion
shown and not accepted, 0 for showing nothing — so it is judged on the same utility as the gate.

Training rows: the simulated user's replay of the *feedback* files (never the gate's held-out files) with
the model the filter is for; each filter records that model's weights hash (``model_sha256``): a filter is
versioned with its model, and ``ownllm rlhf register`` stores it with the model version (the gateway
applies it when ``serve.suggestion_filter`` is on). The gate replays the held-out files with the filter on
(the deployed version: model + filter) beside the model alone, through the same ``filter_input`` /
``feature_row`` / ``SuggestionFilter.show`` as the gateway (feedback/suggestion_filter.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# Features, the classifier's decision and its model check live with the gateway that applies them; training
# uses the very same code.
from feedback.suggestion_filter import FEATURES, SuggestionFilter, feature_row  # noqa: F401


def best_threshold(p: np.ndarray, accepted_chars: np.ndarray, cost: float) -> tuple[float, float]:
    """(threshold, utility per row) maximising the utility of showing exactly the rows with p >= threshold;
    a threshold above every p (show nothing) is a candidate too."""
    gain = np.where(accepted_chars > 0, accepted_chars, -cost)
    order = np.argsort(-p, kind="stable")
    cum = np.concatenate([[0.0], np.cumsum(gain[order])])  # cum[k]: utility of showing the top k
    k = int(np.argmax(cum))
    threshold = float(np.inf) if k == 0 else float(p[order][k - 1])
    return threshold, float(cum[k] / len(p))


def fit(rows: list[dict], cost: float, model_sha256: str, seed: int) -> SuggestionFilter:
    """Fit on shown suggestions' outcomes (rows from ``rlhf.heldout.score``)."""
    from sklearn.linear_model import LogisticRegression

    rows = [r for r in rows if r["suggestion"].strip()]
    if not rows:
        raise ValueError("no shown suggestions to train the suggestion filter on")
    x = np.array([feature_row(r) for r in rows], dtype=float)
    y = np.array([bool(r["accepted"]) for r in rows])
    chars = np.array([r["accepted_chars"] for r in rows], dtype=float)
    if y.all() or not y.any():  # one class: a constant predictor (show all, or nothing)
        coef, intercept = [0.0] * len(FEATURES), (10.0 if y.all() else -10.0)
    else:
        clf = LogisticRegression(max_iter=1000, random_state=seed).fit(x, y)
        coef, intercept = [float(c) for c in clf.coef_[0]], float(clf.intercept_[0])
    f = SuggestionFilter(coef, intercept, 0.0, model_sha256, len(rows), 0.0, 0.0)
    p = f.prob(rows)
    f.threshold, f.train_utility_filtered = best_threshold(p, chars, cost)
    f.train_utility_shown_all = float(np.where(chars > 0, chars, -cost).mean())
    if not np.isfinite(f.threshold):
        f.threshold = 2.0  # show nothing (a probability never reaches 2); JSON has no infinity
    return f


def train_filter(model_dir: str | Path, params, docs: list[dict]) -> SuggestionFilter:
    """Replay the feedback files' cursors with ``model_dir`` and fit its filter on the outcomes."""
    from rlhf.heldout import gate_cursors, score, suggest
    from rlhf.tune import weights_hash

    fcfg = params.rlhf.filter
    gate = params.rlhf.gate.model_copy(update={"seed": fcfg.seed, "cursors_per_file": fcfg.cursors_per_file,
                                               "max_files": None})
    p = params.model_copy(update={"rlhf": params.rlhf.model_copy(update={"gate": gate})})
    cases = gate_cursors(docs, p)
    texts, logprobs = suggest(model_dir, p, cases)
    rows = score(cases, texts, logprobs, p)
    return fit(rows, params.rlhf.gate.reject_cost_chars, weights_hash(model_dir), params.seed)
