"""The W&B logger of a training run: Composer's ``WandBLogger``, offline by default, checkpoints kept local.

Composer 0.32's ``WandBLogger.init`` calls ``wandb.run.get_url()``, which wandb 0.31 removed (it is the
``url`` property now). :func:`wandb_logger` restores the old spelling once, here, rather than pin an
older wandb; nothing else in the project touches wandb's classes.
"""

from __future__ import annotations

from pathlib import Path

from composer.loggers import WandBLogger

from pipeline.config import Params


class LocalCheckpointsWandBLogger(WandBLogger):
    """Checkpoints stay in save_folder (log_artifacts is off): autoresume must not ask W&B for them, which
    needs an API key even in offline mode."""

    def download_file(self, *args, **kwargs):
        raise NotImplementedError("checkpoints are not stored in W&B")


def _restore_run_get_url() -> None:
    import wandb

    run_cls = wandb.sdk.wandb_run.Run
    if not hasattr(run_cls, "get_url"):
        run_cls.get_url = lambda run: run.url


def wandb_logger(params: Params, mode: str) -> LocalCheckpointsWandBLogger:
    """The logger for ``train.run_name`` in ``tracking.project`` (``mode``: offline or online)."""
    _restore_run_get_url()
    Path(params.tracking.wandb_dir).mkdir(parents=True, exist_ok=True)
    return LocalCheckpointsWandBLogger(project=params.tracking.project, name=params.train.run_name, init_kwargs={
        "mode": mode, "dir": params.tracking.wandb_dir, "job_type": "train", "config": params.model_dump(mode="json")})
