"""The suggestion filter as the gateway applies it: features, the classifier's decision, its model check.

A suggestion filter (fitted by rlhf/filter.py: scikit-learn ``LogisticRegression``, threshold maximising
the gate's utility) predicts whether a suggestion will be accepted from what a gateway knows when it has
one: the mean token log-probability of the suggestion (:func:`pipeline.eval.generate.mean_logprob`, the
same function on the replay's and the engines' generations), its length in characters and words, the
cursor's column (characters of the line before it), whether the suggestion repeats text already just above
the cursor, and the language. Training (the replays of ``rlhf.heldout.score``) and serving
(``feedback.app``) build their rows with the one :func:`filter_input` and score them with the one
:func:`feature_row`, so a filter sees the same numbers in both.

A filter belongs to the weights it was fitted for (``model_sha256``, :func:`feedback.lineage.weights_hash`):
a model version carries its filter in the registry (``eval_results["suggestion_filter"]``), and registering
or loading a filter for other weights is refused (:class:`FilterMismatch`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

FEATURES = ("logprob", "chars", "words", "col", "repeats", "python", "javascript", "c")
PREFIX_TAIL_CHARS = 200  # the text above the cursor the features look at (column and repetition)
REGISTRY_KEY = "suggestion_filter"  # where a model version's eval_results keep its filter


class FilterMismatch(ValueError):
    """A suggestion filter fitted for other weights than the model it is being attached to or served with."""


def filter_input(prefix: str, suggestion: str, logprob: float, lang: str | None) -> dict:
    """The filter's view of one suggestion, built the same way at training and at serving time."""
    return {"prefix_tail": prefix[-PREFIX_TAIL_CHARS:], "suggestion": suggestion, "logprob": round(float(logprob), 6),
            "lang": lang}


def feature_row(row: dict) -> list[float]:
    text = row["suggestion"]
    tail = row.get("prefix_tail", "")
    last_line = tail.rsplit("\n", 1)[-1]
    stripped = text.strip()
    return [float(row["logprob"]), float(len(text)), float(len(stripped.split())), float(len(last_line)),
            float(bool(stripped) and stripped in tail), *(float(row.get("lang") == lang) for lang in FEATURES[5:])]


@dataclass
class SuggestionFilter:
    coef: list[float]
    intercept: float
    threshold: float  # show when the predicted acceptance probability is at least this
    model_sha256: str
    train_rows: int
    train_utility_shown_all: float  # utility per cursor on the training rows showing every suggestion
    train_utility_filtered: float  # ... showing only what passes the threshold

    def prob(self, rows: list[dict]) -> np.ndarray:
        x = np.array([feature_row(r) for r in rows], dtype=float)
        return 1.0 / (1.0 + np.exp(-(x @ np.array(self.coef) + self.intercept)))

    def show(self, row: dict) -> bool:
        return bool(self.prob([row])[0] >= self.threshold)

    def to_json(self) -> dict:
        return {**asdict(self), "features": list(FEATURES)}

    def sha256(self) -> str:
        """Content hash of the filter (its lineage entry in the registry)."""
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()

    @classmethod
    def from_json(cls, d: dict, source: str = "suggestion filter") -> "SuggestionFilter":
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
        if d.get("features", list(FEATURES)) != list(FEATURES):
            raise ValueError(f"{source}: features {d.get('features')} are not this gateway's {list(FEATURES)}")
        names = {f.name for f in fields(cls)}
        missing = sorted(names - set(d))
        if missing:
            raise ValueError(f"{source}: missing {', '.join(missing)}")
        if len(d["coef"]) != len(FEATURES):
            raise ValueError(f"{source}: {len(d['coef'])} coefficients for {len(FEATURES)} features")
        return cls(**{k: d[k] for k in names})

    @classmethod
    def read(cls, path: str | Path) -> "SuggestionFilter":
        p = Path(path)
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ValueError(f"suggestion filter {p}: no such file") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"suggestion filter {p}: not valid JSON ({exc.msg})") from None
        return cls.from_json(d, f"suggestion filter {p}")

    def check_model(self, model_dir: str | Path, what: str = "model") -> None:
        """Refuse a filter fitted for other weights than ``model_dir``'s."""
        from feedback.lineage import weights_hash

        try:
            have = weights_hash(model_dir)
        except FileNotFoundError as exc:
            raise FilterMismatch(f"suggestion filter: cannot check the {what}'s weights: {exc}") from None
        if have != self.model_sha256:
            raise FilterMismatch(f"suggestion filter was fitted for weights {self.model_sha256[:12]}, but the {what} "
                                 f"in {model_dir} has weights {have[:12]}: a filter belongs to the model it was "
                                 f"trained for (fit one for this model with `ownllm rlhf gate`)")


def of_version(version) -> SuggestionFilter | None:
    """The filter a registered model version carries, checked against the weights it serves (None: none)."""
    d = (version.eval_results or {}).get(REGISTRY_KEY) if isinstance(version.eval_results, dict) else None
    if d is None:
        return None
    f = SuggestionFilter.from_json(d.get("filter", d), f"model version {version.name}'s suggestion filter")
    f.check_model(version.path, f"model version {version.name!r}")
    return f
