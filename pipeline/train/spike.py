"""Loss-spike detector that names the data.

Like llm-foundry's ``kill_loss_spike`` callback: a step is an outlier when its loss is at least ``k`` times
the mean of the previous ``window`` losses (once the window is full), and ``patience`` consecutive
outliers make a spike. Unlike it (and Lightning's ``SpikeDetection``, which records batch indices), each
flagged step is written to ``spikes.json`` with the sample indices and document ids of that step's global
batch, so the documents can be inspected, bisected (``ownllm bisect``) and excluded. The detector only
reports; it never stops training.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import SpikeConfig


@dataclass
class SpikeTracker:
    """Pure detector state, fed one (step, loss) at a time; usable without Composer (tests, bisect)."""

    k: float
    window: int
    patience: int
    losses: deque = field(default_factory=deque)
    run: list[dict] = field(default_factory=list)  # the current run of consecutive outliers
    reported: int = 0  # how many of `run` have been reported

    @classmethod
    def from_config(cls, cfg: SpikeConfig) -> "SpikeTracker":
        return cls(cfg.k, cfg.window, cfg.patience)

    def update(self, step: int, loss: float) -> list[dict]:
        """Feed a step's loss; returns the outlier records that are (part of) a spike as of this step."""
        flagged: list[dict] = []
        if len(self.losses) == self.window:
            mean = sum(self.losses) / self.window
            # `not <` so that a NaN/inf loss, the worst spike of all, counts as an outlier.
            if not loss < self.k * mean:
                self.run.append({"step": step, "loss": loss, "running_mean": mean, "ratio": loss / mean})
                if len(self.run) >= self.patience:  # report the run so far, then each further outlier
                    flagged = self.run[self.reported:]
                    self.reported = len(self.run)
            else:
                self.run, self.reported = [], 0
        if math.isfinite(loss):  # a NaN/inf in the window would make every later step an outlier
            self.losses.append(loss)
        if len(self.losses) > self.window:
            self.losses.popleft()
        return flagged

    def state_dict(self) -> dict[str, Any]:
        return {"losses": list(self.losses), "run": self.run, "reported": self.reported}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.losses = deque(state["losses"])
        self.run = list(state["run"])
        self.reported = int(state["reported"])


def detect_spikes(losses: list[float], cfg: SpikeConfig) -> list[dict]:
    """All spike records of a whole loss series (steps are list positions)."""
    tracker = SpikeTracker.from_config(cfg)
    out: list[dict] = []
    for step, loss in enumerate(losses):
        out.extend(tracker.update(step, loss))
    return out


def _spike_callback_class():
    from composer.core import Callback, State
    from composer.loggers import Logger
    from composer.utils import dist

    from pipeline.train.batchlog import global_batch, step_of
    from pipeline.tracking import write_json

    class LossSpikeDetector(Callback):
        """Composer callback around SpikeTracker; writes ``<out_dir>/spikes.json`` (a list, empty when calm)."""

        def __init__(self, cfg: SpikeConfig, out_dir: str | Path, skip=None):
            self.tracker = SpikeTracker.from_config(cfg)
            self.path = Path(out_dir) / "spikes.json"
            self.skip = skip
            self.spikes: list[dict] = []
            self.batches: dict[int, tuple[list[int], list[list[str]]]] = {}

        def after_dataloader(self, state: State, logger: Logger) -> None:
            samples, docs, _ = global_batch(state)
            step = step_of(state)
            self.batches[step] = (samples, docs)
            for old in [s for s in self.batches if s < step - self.tracker.patience - 1]:
                del self.batches[old]  # only a pending run of outliers needs older batches

        def batch_end(self, state: State, logger: Logger) -> None:
            step = step_of(state) - 1
            if self.skip is not None and self.skip.contains(step):
                return  # a skipped batch trained nothing; its loss says nothing about the run
            loss = float(state.total_loss_dict.get("loss/train/total", float("nan")))
            for rec in self.tracker.update(step, loss):
                samples, docs = self.batches.get(rec["step"], ([], []))
                rec = {**rec, "sample_idx": samples, "doc_ids": sorted({d for ds in docs for d in ds})}
                self.spikes.append(rec)
                logger.log_metrics({"spike/step": rec["step"], "spike/loss": rec["loss"]})
                if dist.get_global_rank() == 0:
                    write_json(self.path, self.spikes)

        def fit_start(self, state: State, logger: Logger) -> None:
            if dist.get_global_rank() == 0:
                write_json(self.path, self.spikes)

        def fit_end(self, state: State, logger: Logger) -> None:
            if dist.get_global_rank() == 0:
                write_json(self.path, self.spikes)

        def state_dict(self) -> dict[str, Any]:
            return {"tracker": self.tracker.state_dict(), "spikes": self.spikes}

        def load_state_dict(self, state: dict[str, Any]) -> None:
            self.tracker.load_state_dict(state["tracker"])
            self.spikes = list(state["spikes"])

    return LossSpikeDetector


def LossSpikeDetector(cfg: SpikeConfig, out_dir: str | Path, skip=None):  # noqa: N802 - a class, built lazily
    return _spike_callback_class()(cfg, out_dir, skip)
