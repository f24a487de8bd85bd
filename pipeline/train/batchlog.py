"""Per-step records written while training: which samples and documents each step saw, and the loss curve.

``batches.jsonl`` is the after-the-fact record that data determinism promises (``data.batch_for_step``
recomputes the same thing from params); ``loss.csv`` and ``val_loss.csv`` are the curves for
``dvc plots``. Rows are appended and flushed every step, so a killed run keeps its history; on resume
rows at or after the checkpoint's step are dropped, because the resumed run writes them again.
Only deterministic values are written (no timings), so the files hash the same on every run.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist


def sample_digests(input_ids) -> list[str]:
    """Short content hash of each sample's model input (after FIM): proves a recovered batch is the same batch."""
    return [hashlib.sha1(row.cpu().numpy().astype("<i8").tobytes()).hexdigest()[:16] for row in input_ids]


def global_batch(state: State, with_digests: bool = False) -> tuple:
    """(sample indices, document ids per sample, (FIM documents, span-corrupted documents)[, digests]) of the
    whole step, from every rank."""
    batch = state.batch
    local = (batch["sample_idx"].tolist(), batch["doc_ids"],
             (int(batch["fim_docs"].sum()), int(batch["span_docs"].sum())),
             sample_digests(batch["input_ids"]) if with_digests else [])
    parts = dist.all_gather_object(local) if dist.get_world_size() > 1 else [local]
    samples = [s for p in parts for s in p[0]]
    docs = [d for p in parts for d in p[1]]
    out = (samples, docs, (sum(p[2][0] for p in parts), sum(p[2][1] for p in parts)))
    return out + ([h for p in parts for h in p[3]],) if with_digests else out


def step_of(state: State) -> int:
    """0-based index of the step that just finished (BATCH_END) or is about to run (BATCH_START)."""
    return int(state.timestamp.batch.value)


def _truncate_jsonl(path: Path, resume_step: int) -> None:
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] < resume_step]
    path.write_text("".join(ln + "\n" for ln in keep))


def _truncate_csv(path: Path, resume_step: int, header: list[str]) -> None:
    rows = []
    if path.exists():
        with path.open(newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) < resume_step]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)


def _has_step(path: Path, step: int) -> bool:
    if not path.exists():
        return False
    with path.open(newline="") as f:
        return any(int(r["step"]) == step for r in csv.DictReader(f))


class StepRecorder(Callback):
    """Writes batches.jsonl, loss.csv and val_loss.csv under ``out_dir`` (rank 0 only)."""

    LOSS_HEADER = ["step", "train_loss", "lr", "skipped"]
    VAL_HEADER = ["step", "val_loss"]

    def __init__(self, out_dir: str | Path, skip: "SkipSteps | None" = None):
        self.out = Path(out_dir)
        self.skip = skip
        self.fim_docs = 0
        self.span_docs = 0
        self.docs = 0
        self._pending: dict[str, Any] | None = None
        self.last_eval_step = -1

    def state_dict(self) -> dict[str, Any]:
        return {"fim_docs": self.fim_docs, "span_docs": self.span_docs, "docs": self.docs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.fim_docs, self.docs = int(state["fim_docs"]), int(state["docs"])
        self.span_docs = int(state.get("span_docs", 0))  # checkpoints from before span corruption lack it

    def fit_start(self, state: State, logger: Logger) -> None:
        if dist.get_global_rank() != 0:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        start = step_of(state)
        _truncate_jsonl(self.out / "batches.jsonl", start)
        _truncate_csv(self.out / "loss.csv", start, self.LOSS_HEADER)
        _truncate_csv(self.out / "val_loss.csv", start + 1, self.VAL_HEADER)

    def after_dataloader(self, state: State, logger: Logger) -> None:
        step = step_of(state)
        samples, docs, (fim_docs, span_docs), digests = global_batch(state, with_digests=True)
        self.fim_docs += fim_docs
        self.span_docs += span_docs
        self.docs += sum(len(d) for d in docs)
        skipped = bool(self.skip and self.skip.contains(step))
        lr = state.optimizers[0].param_groups[0]["lr"] if state.optimizers else float("nan")
        self._pending = {"step": step, "samples": samples, "doc_ids": docs, "fim_docs": fim_docs, "span_docs": span_docs,
                         "skipped": skipped,
                         "input_sha": digests}
        self._lr = float(lr)

    def batch_end(self, state: State, logger: Logger) -> None:
        if dist.get_global_rank() != 0 or self._pending is None:
            return
        rec, self._pending = self._pending, None
        with (self.out / "batches.jsonl").open("a") as f:
            f.write(json.dumps(rec, sort_keys=True) + "\n")
        loss = state.total_loss_dict.get("loss/train/total", float("nan"))
        if self.skip is not None and rec["step"] in self.skip.empty:
            loss = float("nan")  # no label left in the batch: there is no loss (the model logs a zero)
        with (self.out / "loss.csv").open("a", newline="") as f:
            csv.writer(f, lineterminator="\n").writerow([rec["step"], repr(float(loss)), repr(self._lr),
                                                         int(rec["skipped"])])

    def eval_end(self, state: State, logger: Logger) -> None:
        metric = state.eval_metrics.get("eval", {}).get("LanguageCrossEntropy")
        if metric is None or step_of(state) == self.last_eval_step:
            return
        self.last_eval_step = step_of(state)
        path = self.out / "val_loss.csv"
        if dist.get_global_rank() != 0 or _has_step(path, step_of(state)):
            return  # a re-run of a finished run evaluates its last step again (final_metrics): logged once
        with path.open("a", newline="") as f:
            csv.writer(f, lineterminator="\n").writerow([step_of(state), repr(float(metric.compute()))])


class SkipSteps(Callback):
    """PaLM / Megatron ``--skip-train-iteration-range``: batches in [start, end) are read but not trained on.

    The batch is still drawn (so the data position and everything after it stay exactly where they would
    be) and the step counter and LR schedule advance; only the optimizer update is withheld. Composer has
    no skip hook, so the optimizer consults this callback (see ``trainer.SkippableAdamW``).

    A step whose whole global batch has no label left (every position ``<fim_pad>``, e.g. samples of a
    document excluded with ``shards.exclude_mode: mask``) is skipped the same way, and listed in ``empty``:
    a mean over no tokens is not a loss, and an update from it would only be momentum and weight decay.
    """

    def __init__(self, ranges: list[tuple[int, int]]):
        self.ranges = [tuple(r) for r in ranges]
        self.now = False
        self.skipped: list[int] = []
        self.empty: set[int] = set()

    def contains(self, step: int) -> bool:
        return step in self.empty or any(a <= step < b for a, b in self.ranges)

    def after_dataloader(self, state: State, logger: Logger) -> None:
        from pipeline.train.fim import has_targets

        labels = state.batch["labels"] if isinstance(state.batch, dict) and "labels" in state.batch else None
        if labels is None:
            return
        learns = has_targets(labels)
        if dist.get_world_size() > 1:  # every step: one small tensor all-reduce, not a pickled gather
            flag = state.device.tensor_to_device(torch.tensor([int(learns)]))
            dist.all_reduce(flag, reduce_operation="MAX")
            learns = bool(flag.item())
        if not learns:
            self.empty.add(step_of(state))

    def batch_start(self, state: State, logger: Logger) -> None:
        self.now = self.contains(step_of(state))
        if self.now:
            self.skipped.append(step_of(state))

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped = list(state.get("skipped", []))
