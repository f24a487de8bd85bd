"""`ownllm train`, plus a file of every metric Composer's monitors log: the training step of the GPU check.

    python benchmarks/gpu/train_logged.py --params P --metrics FILE.jsonl

The same ``pipeline.train.trainer.train`` as ``ownllm train`` (same autoresume, same outputs); it only adds a
logger destination that appends SpeedMonitor's / MemoryMonitor's metrics to a JSON-lines file, and a
callback that splits each step's time into waiting for data and the rest (both cheap: one line per step).
W&B is not on the GPU box; this file is what benchmarks/gpu/check.py reads the numbers from.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path


def metrics_file_logger(path: Path):
    from composer.loggers import LoggerDestination

    class JsonlMetrics(LoggerDestination):
        """Appends ``{"step": n, "metrics": {...}}`` per ``log_metrics`` call, flushed at once: a killed run
        keeps what it logged."""

        def __init__(self, out: Path):
            super().__init__()
            self.out = out
            out.parent.mkdir(parents=True, exist_ok=True)
            self.f = out.open("a", encoding="utf-8")

        def log_metrics(self, metrics, step=None):
            clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
            clean.update({k: float(v.item()) for k, v in metrics.items()
                          if hasattr(v, "numel") and v.numel() == 1})
            if clean:
                self.f.write(json.dumps({"step": step, "metrics": clean}, sort_keys=True) + "\n")
                self.f.flush()

        def close(self, state, logger):
            self.f.close()

    return JsonlMetrics(path)


def step_timer():
    from composer.core import Callback

    class StepTimer(Callback):
        """Per step: seconds waiting for the batch, and seconds from batch to the end of the step (forward,
        backward, optimizer, the other callbacks), the device synchronised so the kernels are counted."""

        def __init__(self):
            self.t0 = self.t1 = None

        def before_dataloader(self, state, logger):
            self.t0 = time.perf_counter()

        def after_dataloader(self, state, logger):
            self.t1 = time.perf_counter()

        def batch_end(self, state, logger):
            import torch

            if self.t0 is None or self.t1 is None:
                return
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            now = time.perf_counter()
            logger.log_metrics({"steptime/data_s": self.t1 - self.t0, "steptime/compute_s": now - self.t1})
            self.t0 = self.t1 = None

    return StepTimer()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", required=True)
    ap.add_argument("--metrics", required=True, type=Path, help="JSON-lines file the metrics are appended to")
    args = ap.parse_args(argv)

    from pipeline import numerics
    from pipeline.config import load_params

    params = load_params(args.params)
    numerics.pin_environment(params.numerics)  # as the `ownllm` command does, before torch loads
    from pipeline.train.trainer import train

    summary = train(params, extra_callbacks=[step_timer()], extra_loggers=[metrics_file_logger(args.metrics)])
    speed = summary.pop("_speed", {})
    print(json.dumps({"summary": summary, "speed": speed}, sort_keys=True, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
