"""`ownllm train`: pretrain the base model with Composer, deterministically and resumably.

Reads top to bottom like a training script: params → tokenizer → model → data → optimiser and schedule →
callbacks → ``Trainer.fit()`` → final model and reports. Composer brings the loop, DDP/FSDP, precision,
checkpointing with autoresume and the monitors; our code adds the FIM collator (data.py), the per-step
records (batchlog.py) and the loss-spike detector (spike.py).

``ownllm train --nproc N`` re-runs itself under Composer's launcher (:func:`launch`:
``composer -n N -m pipeline.train.trainer``); the global batch stays ``train.global_batch_size`` whatever the
process count.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from pipeline.config import Params
from pipeline.train import data as tdata
from pipeline.train.model import build_model, composer_model, flops_per_token, n_params

# Fields that do not change the trajectory of a run: changing them may resume from the same checkpoints.
NON_TRAJECTORY_FIELDS = {"log_every", "num_workers", "reports_dir", "spike", "final_model", "save_folder",
                         "eval_interval", "eval_batches", "save_interval", "save_num_checkpoints_to_keep"}


def run_fingerprint(params: Params) -> str:
    """Hash of everything that determines the loss curve: data, tokenizer, model, optimisation, seeds.

    Checkpoints live under ``save_folder/<fingerprint>/`` so autoresume only ever resumes the same run; a
    changed parameter (or a rewind with ``skip_steps``) starts in a fresh folder instead of silently
    continuing from an incompatible checkpoint.
    """
    h = hashlib.sha256()
    train = {k: v for k, v in params.train.model_dump(mode="json").items() if k not in NON_TRAJECTORY_FIELDS}
    h.update(json.dumps({"seed": params.seed, "model": params.model.model_dump(mode="json"), "train": train},
                        sort_keys=True).encode())
    for split in ("train", "val"):
        h.update((tdata.split_dir(params, split) / "index.json").read_bytes())
    tok = Path(params.tokenizer.out) / "tokenizer.json"
    if tok.is_file():
        h.update(tok.read_bytes())
    return h.hexdigest()[:12]


def checkpoint_dir(params: Params) -> Path:
    return Path(params.train.save_folder) / run_fingerprint(params)


def resolve_device(params: Params) -> tuple[str, str]:
    t = params.train
    device = t.device if t.device != "auto" else ("gpu" if torch.cuda.is_available() else "cpu")
    if device == "gpu" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'gpu' but no CUDA device is visible")
    precision = t.precision if t.precision != "auto" else ("amp_bf16" if device == "gpu" else "fp32")
    return device, precision


def _optimizer_class():
    from composer.optim import DecoupledAdamW

    class SkippableAdamW(DecoupledAdamW):
        """DecoupledAdamW that withholds the update on steps the SkipSteps callback marks (and only then)."""

        def __init__(self, params, skip, **kwargs):
            super().__init__(params, **kwargs)
            self._skip = skip

        @torch.no_grad()
        def step(self, closure=None):
            if self._skip is not None and self._skip.now:
                return None
            return super().step(closure)

    return SkippableAdamW


def _check_shapes(params: Params) -> None:
    if params.shards.max_seq_len > params.model.max_seq_len:
        raise ValueError(f"shards.max_seq_len={params.shards.max_seq_len} exceeds model.max_seq_len="
                         f"{params.model.max_seq_len}: the model cannot attend over a whole sample")


class BuiltTrainer(NamedTuple):
    trainer: Any  # composer.Trainer
    tokenizer: Any
    callbacks: Any  # pipeline.train.callbacks.TrainCallbacks: skip, recorder, spike, monitors by name


def build_trainer(params: Params, device: str, precision: str, extra_callbacks: list | None = None,
                  extra_loggers: list | None = None) -> BuiltTrainer:
    from composer import Evaluator, Trainer
    from composer.algorithms import GradientClipping
    from composer.core import DataSpec
    from composer.optim import CosineAnnealingWithWarmupScheduler
    from composer.utils import dist
    from torch.utils.data import DataLoader

    from pipeline.train.callbacks import build_callbacks
    from pipeline.tracking import wandb_mode

    t = params.train
    world = dist.get_world_size()
    if world > 1:
        # Join the process group before the datasets exist. Otherwise each StreamingDataset brings up (and
        # tears down) a group of its own on the same MASTER_PORT, racing Composer's: a rank can reach the
        # dying store and fail ("failed to recv") or wait for workers forever. llm-foundry's train script
        # initialises dist first for the same reason; the Trainer then finds it initialised.
        dist.initialize_dist(device, timeout=300.0)
    if t.global_batch_size % world:
        raise ValueError(f"train.global_batch_size={t.global_batch_size} is not divisible by the {world} processes")
    device_batch = t.global_batch_size // world
    _check_shapes(params)

    tokenizer = tdata.load_tokenizer(params)
    model = build_model(params.model, tokenizer, params.seed)
    cmodel = composer_model(model, tokenizer)

    collate = tdata.Collator.from_params(params, tokenizer)
    train_ds = tdata.make_dataset(params, "train", device_batch)
    train_dl = DataLoader(train_ds, batch_size=device_batch, collate_fn=collate, drop_last=True,
                          num_workers=t.num_workers, persistent_workers=t.num_workers > 0)
    # Validation is plain next-token prediction, so its loss compares with the unigram entropy.
    val_collate = tdata.Collator(tokenizer, params.seed, 0.0, 0.0, t.fim_min_tokens)
    val_dl = DataLoader(tdata.make_dataset(params, "val", device_batch), batch_size=device_batch,
                        collate_fn=val_collate, drop_last=False)
    evaluator = Evaluator(label="eval", dataloader=val_dl, metric_names=["LanguageCrossEntropy", "LanguagePerplexity"],
                          subset_num_batches=t.eval_batches)

    callbacks = build_callbacks(params, device, extra_callbacks)
    optimizer = _optimizer_class()(cmodel.parameters(), callbacks.skip, lr=t.lr, betas=t.betas, eps=t.eps,
                                   weight_decay=t.weight_decay)
    scheduler = CosineAnnealingWithWarmupScheduler(t_warmup=t.warmup, alpha_f=t.lr_min_ratio)

    loggers = list(extra_loggers or [])
    mode = wandb_mode(params)
    if mode != "disabled":
        from pipeline.train.wandb_logger import wandb_logger

        loggers.append(wandb_logger(params, mode))

    trainer = Trainer(
        model=cmodel,
        train_dataloader=DataSpec(train_dl, get_num_samples_in_batch=lambda b: int(b["input_ids"].shape[0])),
        eval_dataloader=evaluator,
        eval_interval=t.eval_interval,
        max_duration=t.max_duration,
        optimizers=optimizer,
        schedulers=scheduler,
        algorithms=[GradientClipping(clipping_type="norm", clipping_threshold=t.grad_clip_norm)],
        callbacks=callbacks.ordered(),
        loggers=loggers,
        device=device,
        precision=precision,
        device_train_microbatch_size=t.device_microbatch_size,
        save_folder=str(checkpoint_dir(params)),
        save_interval=t.save_interval,
        save_num_checkpoints_to_keep=t.save_num_checkpoints_to_keep,
        save_latest_filename="latest-rank{rank}.pt",
        autoresume=True,
        load_path=t.load_path,
        run_name=t.run_name,
        seed=params.seed,
        deterministic_mode=True,
        progress_bar=False,
        log_to_console=True,
        console_log_interval=f"{t.log_every}ba",
        parallelism_config={"fsdp": t.fsdp} if t.fsdp else None,
    )
    return BuiltTrainer(trainer, tokenizer, callbacks)


def final_metrics(trainer, recorder) -> dict[str, float]:
    """Validation loss and perplexity over the configured validation batches, with the final weights."""
    if recorder.last_eval_step != int(trainer.state.timestamp.batch.value):  # not evaluated at the last step
        trainer.eval()
    metrics = trainer.state.eval_metrics["eval"]
    return {"val_loss": float(metrics["LanguageCrossEntropy"].compute()),
            "val_perplexity": float(metrics["LanguagePerplexity"].compute())}


def unigram_baseline(params: Params, vocab_size: int) -> dict[str, float]:
    """Unigram entropy of the training tokens and the cross-entropy of that unigram model on validation (nats).

    A model that learned nothing beyond token frequencies scores about the latter; ours must be well below.
    """
    counts = {}
    for split in ("train", "val"):
        ds = tdata.make_dataset(params, split, 1)
        c = np.zeros(vocab_size, dtype=np.int64)
        for i in range(ds.size):
            c += np.bincount(ds[i]["tokens"], minlength=vocab_size)[:vocab_size]
        counts[split] = c
        tdata.release(ds)
    p = (counts["train"] + 1) / (counts["train"].sum() + vocab_size)  # add-one: unseen val tokens stay finite
    train_p = counts["train"][counts["train"] > 0] / counts["train"].sum()
    return {"unigram_entropy": float(-(train_p * np.log(train_p)).sum()),
            "val_unigram_cross_entropy": float(-(counts["val"] * np.log(p)).sum() / counts["val"].sum())}


def read_curve(reports_dir: str | Path) -> list[dict[str, str]]:
    import csv

    path = Path(reports_dir) / "loss.csv"
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def train(params: Params, extra_callbacks: list | None = None, extra_loggers: list | None = None) -> dict[str, Any]:
    """Train (or resume) the run params describe; returns the summary written to reports/train.json.

    ``extra_callbacks`` / ``extra_loggers`` are added to Composer's (benchmarks/gpu records the monitors'
    metrics to a file through them)."""
    from composer.utils import dist

    from pipeline import numerics
    from pipeline.tracking import write_json

    numerics.apply(params.numerics)  # the environment half was pinned by the `ownllm` command before torch loaded
    if params.train.num_threads:
        torch.set_num_threads(params.train.num_threads)
    device, precision = resolve_device(params)
    started = time.perf_counter()
    trainer, tokenizer, callbacks = build_trainer(params, device, precision, extra_callbacks, extra_loggers)
    skip, recorder = callbacks.skip, callbacks.recorder
    resumed_from = int(trainer.state.timestamp.batch.value)
    max_duration = trainer.state.max_duration
    if trainer.state.timestamp.get(max_duration.unit) < max_duration:
        trainer.fit()
    # else: autoresume found the run already complete; only the outputs are written again.
    fit_seconds = time.perf_counter() - started
    final = final_metrics(trainer, recorder)
    # Every rank takes part: streaming datasets synchronise their processes when they open.
    baseline = unigram_baseline(params, len(tokenizer))
    state = trainer.state
    tokens = int(state.timestamp.token.value)
    steps = int(state.timestamp.batch.value)

    summary: dict[str, Any] = {}
    if dist.get_global_rank() == 0:
        model = state.model.module.model if hasattr(state.model, "module") else state.model.model
        Path(params.train.final_model).mkdir(parents=True, exist_ok=True)
        model.save_pretrained(params.train.final_model, safe_serialization=True)
        curve = read_curve(params.train.reports_dir)
        trained = [float(r["train_loss"]) for r in curve if r["skipped"] == "0"]
        last = trained[-params.train.log_every:] or [float("nan")]
        spikes = json.loads((Path(params.train.reports_dir) / "spikes.json").read_text())
        summary = {
            "steps": steps,
            "tokens_seen": tokens,
            "world_size": dist.get_world_size(),
            "params": n_params(model),
            "final_train_loss": float(np.mean(last)),
            **final,
            **baseline,
            "objectives": {"fim_rate": params.train.fim_rate, "fim_spm_rate": params.train.fim_spm_rate,
                           "span_corruption_rate": params.train.span_corruption_rate,
                           "span_mean_length": params.train.span_mean_length,
                           "span_noise_density": params.train.span_noise_density,
                           "next_token_rate": 1 - params.train.fim_rate - params.train.span_corruption_rate,
                           "fim_docs_seen": recorder.fim_docs, "span_docs_seen": recorder.span_docs,
                           "docs_seen": recorder.docs,
                           "fim_fraction_seen": recorder.fim_docs / max(1, recorder.docs),
                           "span_fraction_seen": recorder.span_docs / max(1, recorder.docs)},
            "skip_steps": [list(r) for r in params.train.skip_steps],
            "skipped_batches": len(skip.skipped),
            "spikes": len(spikes),
            "checkpoints": str(checkpoint_dir(params)),
        }
        write_json(Path(params.tracking.reports_dir) / "train.json", summary)
        # The numerics fingerprint is a DVC output: the committed lock says what numerics made the weights.
        write_json(Path(params.train.reports_dir) / "numerics.json", numerics.record(params.numerics, device))
        # Timings differ run to run, so they stay out of the DVC-tracked metrics (see pipeline/tracking.py).
        new_tokens = tokens * (steps - resumed_from) / max(1, steps)
        speed = {"fit_seconds": fit_seconds, "tokens_per_second": new_tokens / fit_seconds,
                 "mfu_flops_per_second": new_tokens * flops_per_token(model, params.shards.max_seq_len) / fit_seconds,
                 "device": device, "precision": precision, "resumed_from_step": resumed_from,
                 "machine": numerics.machine()}
        write_json(Path(params.train.reports_dir) / "speed.json", speed)
        trainer.logger.log_metrics({f"summary/{k}": v for k, v in summary.items() if isinstance(v, (int, float))})
        summary["_speed"] = speed
    trainer.close()
    return summary


def launch(args) -> int:
    """Re-run this command under Composer's launcher with ``--nproc`` processes (it sets up DDP)."""
    import subprocess

    from pipeline.tools import find_tool, tool_env

    cmd = [find_tool("composer"), "-n", str(args.nproc), "-m", "pipeline.train.trainer", "--params", args.params]
    if getattr(args, "skip_steps", None):
        cmd += ["--skip-steps", *args.skip_steps]
    if getattr(args, "load_path", None):
        cmd += ["--load-path", args.load_path]
    return subprocess.call(cmd, env=tool_env())


def main(args) -> int:
    from pipeline.config import load_params
    from pipeline.tracking import say

    if getattr(args, "nproc", 1) > 1 and "WORLD_SIZE" not in os.environ:
        return launch(args)
    params = load_params(args.params)
    overrides: dict[str, Any] = {}
    if getattr(args, "skip_steps", None):
        overrides["skip_steps"] = [tuple(int(x) for x in r.split(":")) for r in args.skip_steps]
    if getattr(args, "load_path", None):
        overrides["load_path"] = args.load_path
    if overrides:
        from pipeline.config import parse_params

        data = params.model_dump(mode="json", exclude={"source_file"})
        data["train"].update(overrides)
        params = parse_params(data, f"{params.source_file} + command-line overrides")
    try:
        summary = train(params)
    except (FileNotFoundError, ValueError) as exc:
        from pipeline.cli import UserError

        raise UserError(str(exc)) from None
    if summary:
        speed = summary.pop("_speed")
        say(f"[train] {summary['steps']} steps, {summary['tokens_seen']:,} tokens, {summary['params']:,} params: "
            f"train loss {summary['final_train_loss']:.3f}, val loss {summary['val_loss']:.3f} "
            f"(unigram {summary['val_unigram_cross_entropy']:.3f}), ppl {summary['val_perplexity']:.1f}, "
            f"{speed['tokens_per_second']:,.0f} tok/s on {speed['device']}, {summary['spikes']} spikes")
    return 0


if __name__ == "__main__":  # `composer -n N -m pipeline.train.trainer --params params.yaml`
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--skip-steps", nargs="*", default=None)
    ap.add_argument("--load-path", default=None)
    raise SystemExit(main(ap.parse_args()))

