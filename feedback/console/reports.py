"""The console's view of the pipeline's report files: read as the stages wrote them, never recomputed.

Paths come from params (the same keys the stages write to), so a console started with ``--params FILE``
reads that profile's reports. A missing file is "not produced yet" (the page says which stage makes it);
an unreadable one is named with its error rather than crashing the page.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# A curve with more points than this is thinned for drawing only (every k-th point, the last always kept);
# the tables and the files keep every value. 1000 steps of the default draw unthinned.
MAX_CHART_POINTS = 4000


@dataclass(frozen=True)
class ReportPaths:
    loop: Path  # reports/loop.json (loop stage: every refresh round)
    gate: Path  # reports/rlhf_gate.json
    train_dir: Path  # reports/train/: loss.csv, val_loss.csv, spikes.json
    data_stats: Path  # reports/data/stats.json
    bisect_dir: Path  # reports/bisect/<run>-<step>.json

    @classmethod
    def from_params(cls, params=None) -> "ReportPaths":
        """From a loaded ``Params``, or from each section's defaults when there is none (tests, embedding)."""
        from pipeline.config import BisectConfig, StatsConfig, TrackingConfig, TrainConfig

        tracking = params.tracking if params else TrackingConfig()
        train = params.train if params else TrainConfig()
        stats = params.data.stats if params else StatsConfig()
        bisect = params.bisect if params else BisectConfig()
        reports = Path(tracking.reports_dir)
        return cls(loop=reports / "loop.json", gate=reports / "rlhf_gate.json", train_dir=Path(train.reports_dir),
                   data_stats=Path(stats.out) / "stats.json", bisect_dir=Path(bisect.out))


@dataclass
class Loaded:
    """A report file's content, or why there is none (``missing``: not produced yet; ``error``: unreadable)."""

    path: Path
    data: Any = None
    missing: bool = False
    error: str | None = None


def load_json(path: Path) -> Loaded:
    if not path.is_file():
        return Loaded(path, missing=True)
    try:
        return Loaded(path, json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError) as exc:
        return Loaded(path, error=f"cannot read {path}: {exc}")


def read_curve(path: Path, y: str) -> Loaded:
    """``step`` and ``y`` columns of a training CSV as two lists (rows with an empty or non-numeric value skipped)."""
    if not path.is_file():
        return Loaded(path, missing=True)
    xs, ys = [], []
    try:
        with path.open(newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                try:
                    xs.append(int(row["step"]))
                    ys.append(float(row[y]))
                except (KeyError, TypeError, ValueError):
                    continue
    except OSError as exc:
        return Loaded(path, error=f"cannot read {path}: {exc}")
    return Loaded(path, {"step": xs, y: ys})


def thin(xs: list, ys: list, limit: int = MAX_CHART_POINTS) -> tuple[list, list]:
    if len(xs) <= limit:
        return xs, ys
    k = -(-len(xs) // limit)
    idx = list(range(0, len(xs), k))
    if idx[-1] != len(xs) - 1:
        idx.append(len(xs) - 1)
    return [xs[i] for i in idx], [ys[i] for i in idx]


def bisect_reports(bisect_dir: Path) -> dict[str, Path]:
    """``<run>-<step>`` → report file (the ``.timing.json`` side files hold wall times only and are left out)."""
    if not bisect_dir.is_dir():
        return {}
    return {p.name[:-5]: p for p in sorted(bisect_dir.glob("*.json")) if not p.name.endswith(".timing.json")}


def loop_rounds(loop: dict) -> list[dict]:
    """The refresh rounds of ``reports/loop.json``: its ``rounds`` list, or the file itself as the one round."""
    rounds = loop.get("rounds")
    if isinstance(rounds, list):
        return [r for r in rounds if isinstance(r, dict)]
    return [loop]


def rounds_chart(rounds: list[dict]) -> dict:
    """Each metric's tuned value per round (None where a round lacks it), for the Loop page's chart."""
    names = sorted({m for r in rounds for m in (r.get("metrics") or {})})
    series = [{"label": m, "values": [((r.get("metrics") or {}).get(m) or {}).get("tuned") for r in rounds]}
              for m in names]
    return {"x": list(range(1, len(rounds) + 1)), "series": series}
