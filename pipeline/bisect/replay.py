"""Replay a stretch of training exactly, optionally with some documents taken out of the data.

Data determinism (pipeline/train/data.py) means the batches of any step follow from params alone, and
Composer's checkpoints carry the model, optimizer, scheduler, RNG and dataloader position. So a replay
is simply the same Composer ``Trainer`` (``train.build_trainer``) loaded from the last checkpoint before
the spike and run to the spike step, into a scratch folder, with W&B off. With nothing dropped it gives
the run's own losses bit for bit; with a set of documents dropped it answers "would the run still have
spiked without these documents?".

Dropping a document means: its token positions become ``<fim_pad>`` in the input and are masked out
of the labels, in every step of the window. Packing and the order of everything else stay as they were,
so exactly one thing changes. A step whose every label is dropped trains nothing (its optimizer update
is withheld, as ``train.skip_steps`` does), because a mean over no tokens is not a loss.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import Params, parse_params

CHECKPOINT_RE = re.compile(r"^ep(\d+)-ba(\d+)-rank0\.pt$")


# --------------------------------------------------------------------------------------- the window
def checkpoint_before(params: Params, step: int) -> tuple[Path | None, int]:
    """(checkpoint, its batch count) of the latest checkpoint of this run taken before ``step`` ran.

    A checkpoint ``ep*-baN`` holds the state after N steps, so it can replay steps N..step when N <= step.
    Without one, the replay starts from the seeded initialisation at step 0 (a valid, longer replay).
    """
    from pipeline.train.trainer import checkpoint_dir

    folder = checkpoint_dir(params)
    best: tuple[Path | None, int] = (None, 0)
    if folder.is_dir():
        for f in sorted(folder.iterdir()):
            m = CHECKPOINT_RE.match(f.name)
            if m and best[1] <= int(m.group(2)) <= step and f.is_file():
                best = (f, int(m.group(2)))
    return best


@dataclass
class Window:
    """The steps ``start..spike`` (inclusive) with each sample's document spans, in training order."""

    start: int
    spike: int
    samples: dict[int, list[int]]  # step -> global sample indices
    spans: dict[int, list[list]]  # sample index -> [[doc_id, doc_start, sample_start, n], ...]

    def documents(self) -> list[str]:
        """Every document of the window, in order of first appearance."""
        seen: dict[str, None] = {}
        for step in sorted(self.samples):
            for idx in self.samples[step]:
                for span in self.spans[idx]:
                    seen.setdefault(span[0], None)
        return list(seen)

    def by_recency(self) -> list[str]:
        """Documents read closest to the spike first (ties: first appearance), the order bisecting splits.

        Dropping a document read early in a long window removes training before the spike, and a less
        trained model may not spike at all; trying the most recent documents first keeps the early
        tests closest to the real run and tries the spike step's own documents in the first test.
        """
        last: dict[str, int] = {}
        for step in sorted(self.samples):
            for idx in self.samples[step]:
                for span in self.spans[idx]:
                    last[span[0]] = step
        order = self.documents()
        return sorted(order, key=lambda d: (-last[d], order.index(d)))

    def steps_of(self, doc_id: str) -> list[int]:
        return [s for s in sorted(self.samples) if any(sp[0] == doc_id for i in self.samples[s] for sp in self.spans[i])]


def load_window(params: Params, start: int, spike: int, tokenizer=None) -> Window:
    """Recover which samples steps ``start..spike`` read and which documents each sample was cut from."""
    from pipeline.train import data as tdata

    steps = list(range(start, spike + 1))
    batches = tdata.batches_for_steps(params, steps, tokenizer)
    samples = {b.step: b.sample_idx for b in batches}
    ds = tdata.make_dataset(params, "train", params.train.global_batch_size)
    try:
        spans = {i: [list(sp) for sp in ds[i]["doc_spans"]] for b in batches for i in b.sample_idx}
    finally:
        tdata.release(ds)
    return Window(start, spike, samples, spans)


# ------------------------------------------------------------------------------------- the callback
def _drop_callback_class():
    from composer.core import Callback, State
    from composer.loggers import Logger

    from pipeline.train.batchlog import step_of
    from pipeline.train.fim import IGNORE_INDEX, has_targets

    class DropDocuments(Callback):
        """Takes documents out of each batch, records every step's loss and the spike step's token losses."""

        def __init__(self, window: Window, drop: set[str], pad_id: int, skip):
            self.window, self.drop, self.pad_id, self.skip = window, drop, pad_id, skip
            self.losses: dict[int, float] = {}
            self.token_losses: dict[int, np.ndarray] = {}  # sample idx -> loss of predicting each position
            self.label_mask: dict[int, np.ndarray] = {}

        def after_dataloader(self, state: State, logger: Logger) -> None:
            step = step_of(state)
            if not self.drop or step not in self.window.samples:
                return
            batch = state.batch
            for row, idx in enumerate(batch["sample_idx"].tolist()):
                for doc, _doc_start, start, n in self.window.spans[int(idx)]:
                    if doc in self.drop:
                        batch["input_ids"][row, start:start + n] = self.pad_id
                        batch["labels"][row, start:start + n] = IGNORE_INDEX
            if not has_targets(batch["labels"]):
                self.skip.ranges.append((step, step + 1))  # nothing left to learn from at this step

        def after_forward(self, state: State, logger: Logger) -> None:
            if step_of(state) != self.window.spike:
                return
            logits = state.outputs["logits"].detach().float()
            labels = state.batch["labels"]
            ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:],
                                                   ignore_index=IGNORE_INDEX, reduction="none")
            for row, idx in enumerate(state.batch["sample_idx"].tolist()):
                # Position j's loss is that of predicting token j from tokens < j (position 0 has none).
                self.token_losses[int(idx)] = np.concatenate([[np.nan], ce[row].numpy()])
                self.label_mask[int(idx)] = (labels[row] != IGNORE_INDEX).numpy() & (np.arange(labels.shape[1]) > 0)

        def batch_end(self, state: State, logger: Logger) -> None:
            step = step_of(state) - 1
            labels = state.batch["labels"]
            if not has_targets(labels):
                self.losses[step] = None  # nothing of this step is left: no loss (and no update)
            else:
                self.losses[step] = float(state.total_loss_dict.get("loss/train/total", float("nan")))
            if step == self.window.spike:
                # Stop here rather than shorten max_duration: the LR schedule is a function of max_duration,
                # so changing it would change every replayed step.
                state.stop_training()

    return DropDocuments


# ----------------------------------------------------------------------------------------- a replay
@dataclass
class ReplayResult:
    dropped: list[str]
    losses: dict[int, float | None]  # step -> train loss, for every replayed step
    spike_loss: float | None  # None when every token of the spike step was dropped
    sample_losses: dict[int, float] = field(default_factory=dict)  # spike step: sample idx -> mean loss
    doc_losses: dict[str, dict[str, float]] = field(default_factory=dict)  # spike step: doc -> loss, tokens
    seconds: float = 0.0


def replay_params(params: Params, scratch: Path, load_path: Path | None, spike: int) -> Params:
    """The run's params, pointed at a scratch folder. max_duration stays: the callback stops at the spike."""
    data = params.model_dump(mode="json", exclude={"source_file"})
    data["tracking"].update(wandb_mode="disabled", reports_dir=str(scratch / "reports"))
    far = f"{spike + 10_000}ba"  # neither evaluation nor checkpoints inside the replay (they do not change it)
    data["train"].update(save_folder=str(scratch / "checkpoints"), reports_dir=str(scratch / "reports/train"),
                         final_model=str(scratch / "final"), load_path=str(load_path) if load_path else None,
                         eval_interval=far, save_interval=far)
    return parse_params(data, f"{params.source_file} (bisect replay)")


def _per_doc(window: Window, token_losses: dict[int, np.ndarray], masks: dict[int, np.ndarray]) -> dict:
    sums: dict[str, list[float]] = {}
    for idx, losses in token_losses.items():
        for doc, _a, start, n in window.spans[idx]:
            sel = masks[idx][start:start + n]
            vals = losses[start:start + n][sel]
            acc = sums.setdefault(doc, [0.0, 0])
            acc[0] += float(vals.sum())
            acc[1] += int(sel.sum())
    return {d: {"loss": s / n if n else float("nan"), "tokens": n} for d, (s, n) in sorted(sums.items())}


def replay(params: Params, window: Window, load_path: Path | None, drop: set[str] = frozenset()) -> ReplayResult:
    """Train steps ``window.start..window.spike`` again from ``load_path`` with ``drop`` taken out."""
    import os

    from pipeline.train.trainer import build_trainer, resolve_device

    started = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="ownllm-bisect-"))
    old_mode = os.environ.pop("OWNLLM_WANDB_MODE", None)  # a replay never logs to W&B
    try:
        rparams = replay_params(params, scratch, load_path, window.spike)
        if rparams.train.num_threads:
            torch.set_num_threads(rparams.train.num_threads)
        device, precision = resolve_device(rparams)
        trainer, tokenizer, callbacks = build_trainer(rparams, device, precision)
        cb = _drop_callback_class()(window, set(drop), tokenizer.pad_token_id, callbacks.skip)
        trainer.state.callbacks.append(cb)
        trainer.fit()
        trainer.close()
        del trainer
    finally:
        if old_mode is not None:
            os.environ["OWNLLM_WANDB_MODE"] = old_mode
        shutil.rmtree(scratch, ignore_errors=True)
        import gc

        gc.collect()  # frees the dataset's shared memory before the next replay opens it again
    if window.spike not in cb.losses:
        raise RuntimeError(f"the replay from {load_path or 'initialisation'} did not reach step {window.spike}")
    sample_losses = {}
    for idx, losses in sorted(cb.token_losses.items()):
        m = cb.label_mask[idx]
        sample_losses[idx] = float(losses[m].mean()) if m.any() else float("nan")
    return ReplayResult(sorted(drop), dict(sorted(cb.losses.items())), cb.losses[window.spike], sample_losses,
                        _per_doc(window, cb.token_losses, cb.label_mask), time.perf_counter() - started)

