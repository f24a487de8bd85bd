"""The callbacks of a training run, built from params in one place (as llm-foundry's ``build_callback``).

Ours: :class:`~pipeline.train.batchlog.SkipSteps` (steps to skip, bisect's remedy),
:class:`~pipeline.train.batchlog.StepRecorder` (batches.jsonl, loss.csv, val_loss.csv) and the loss-spike
detector (spike.py); Composer's monitors (speed, learning rate, remaining time, GPU memory) log to the
loggers. The run keeps them by name, so later code reads ``callbacks.recorder``, never a search of the
trainer's callback list by class name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import Params
from pipeline.train.batchlog import SkipSteps, StepRecorder
from pipeline.train.spike import LossSpikeDetector


@dataclass
class TrainCallbacks:
    skip: SkipSteps
    recorder: StepRecorder
    spike: Any  # LossSpikeDetector (a Composer Callback built lazily, see spike.py)
    monitors: list = field(default_factory=list)
    extra: list = field(default_factory=list)

    def ordered(self) -> list:
        """In the order Composer runs them: the skip decision first, our records after the monitors."""
        return [self.skip, *self.monitors, self.recorder, self.spike, *self.extra]


def build_callbacks(params: Params, device: str, extra: list | None = None) -> TrainCallbacks:
    from composer.callbacks import LRMonitor, MemoryMonitor, RuntimeEstimator, SpeedMonitor

    t = params.train
    out = Path(t.reports_dir)
    skip = SkipSteps(t.skip_steps)
    monitors = [SpeedMonitor(window_size=t.log_every), LRMonitor(), RuntimeEstimator()]
    if device == "gpu":
        monitors.append(MemoryMonitor())
    return TrainCallbacks(skip, StepRecorder(out, skip), LossSpikeDetector(t.spike, out, skip), monitors,
                          list(extra or []))
