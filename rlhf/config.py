"""The RLHF sections of params.yaml (`rlhf`, with its `gate`, `filter` and `loop`), owned by this package.

``RLHFParams`` extends the feedback layer's schema; it is registered under the ``ownllm.params`` entry
point (pyproject.toml), so ``pipeline.config.load_params`` validates them in every stage's file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from feedback.config import FeedbackParams
from pipeline.config import Section, load_params


class RLHFGateConfig(Section):
    # The held-out replay (rlhf/heldout.py): this share of the validation files, chosen by a hash of the
    # document id, is the gate's alone: simulate, bounties, snapshot and tuning never see them.
    heldout_frac: float = Field(0.5, gt=0, lt=1)
    cursors_per_file: int = Field(32, ge=1)  # cursors per held-out file (fewer where a file has fewer lines)
    max_files: int | None = Field(None, ge=1)  # null: every held-out file
    max_tokens: int = Field(24, ge=1)  # suggestion length (greedy, cut at the end of the line)
    batch_size: int = Field(64, ge=1)
    # Utility per cursor = accepted characters - reject_cost_chars for every suggestion shown and not accepted.
    reject_cost_chars: float = Field(2.0, ge=0)
    # Non-inferiority: pass when the 95% CI's lower bound of the utility difference (tuned - parent,
    # characters per cursor) is above -margin; promote to `promote_to` only when the gain is significant.
    margin: float = 0.1  # negative: a superiority margin (tuned must be better by at least -margin)
    alpha: float = Field(0.05, gt=0, lt=1)
    promote_to: str = "all"
    # HumanEval / FIM exact match: tuned may be worse than its parent by at most regression_z standard
    # errors of the parent's rate on that many cases (pipeline.eval.paired.sampling_tolerance).
    regression_z: float = Field(1.96, gt=0)
    resamples: int = Field(4999, ge=99)  # bootstrap / permutation resamples
    seed: int = 13
    skip_humaneval: bool = False  # the tiny CPU default may skip the slow HumanEval part of the gate


class RLHFFilterConfig(Section):
    # The suggestion filter (rlhf/filter.py): fitted per tuned model on a replay of the feedback files, judged
    # by the gate as part of the deployed version (model + filter).
    enabled: bool = True
    cursors_per_file: int = Field(8, ge=1)  # training replay: cursors per feedback file
    seed: int = 17


class RLHFLoopConfig(Section):
    # Refresh rounds after the first (`dvc repro`: the snapshot ... register stages are round 1). Key: the round
    # ("round-N", DVC's stage refresh@round-N, output <dir>/round-N); value: the output of the round before it,
    # which DVC cannot compute from N (round 2: round 1's register report; round N: <dir>/round-(N-1)).
    dir: str = "loop"
    rounds: dict[str, str] = {}

    @field_validator("rounds", mode="before")
    @classmethod
    def _round_names(cls, v):
        for key in (v or {}):
            if not (isinstance(key, str) and re.fullmatch(r"round-([2-9]|[1-9][0-9]+)", key)):
                raise ValueError(f"round {key!r}: name later rounds 'round-2', 'round-3', ... (round 1 is the "
                                 f"snapshot ... register stages; DVC silently drops integer keys)")
        return v


class RLHFConfig(Section):
    snapshot_dir: str = "data/feedback"
    base_model: str = "models/base"  # parent when no model version is in production yet
    sft_out: str = "models/sft"
    tuned_out: str = "models/tuned"
    work_dir: str = "checkpoints/rlhf"  # trainer scratch (nothing is saved there by default)
    registry_dir: str = "models/registry"  # registered versions' weights, one folder per version
    method: Literal["dpo", "kto", "none"] = "dpo"  # none: no preference step, tuned = the SFT model
    min_pairs: int = Field(8, ge=1)
    sft_epochs: float = Field(1.0, gt=0)
    dpo_epochs: float = Field(1.0, gt=0)
    sft_max_steps: int | None = Field(None, ge=1)  # caps the epochs (the CPU default stays in minutes)
    dpo_max_steps: int | None = Field(None, ge=1)
    lr: float = Field(5e-5, gt=0)  # SFT
    dpo_lr: float | None = Field(None, gt=0)  # preference tuning (DPO/KTO); null = lr
    # SFT when the parent is itself a tuned version (a later loop round, a refresh from a registered version): a
    # tuned model needs a smaller step than the base (docs/BENCHMARKS.md, "three rounds"); null = lr
    retune_lr: float | None = Field(None, gt=0)
    beta: float = Field(0.1, gt=0)
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_length: int = Field(256, ge=8)
    max_prompt_chars: int = Field(1024, ge=16)  # snapshot keeps the end of longer prompts (the cursor side)
    max_pairs_per_context: int = Field(4, ge=1)  # a busy context must not dominate the preferences
    # The learners' data (each measured separately, docs/RLHF.md): SFT on kept code (the cursor's FIM prompt ->
    # what the user kept), SFT on bounties, and the preference pairs' chosen side at a cursor.
    sft_kept: bool = True
    sft_bounties: bool = True
    chosen: Literal["kept", "accepted", "both"] = "kept"  # accepted is used where nothing was kept
    rpo_alpha: float | None = Field(None, ge=0)  # DPO + this x NLL on the chosen (TRL rpo_alpha); null = plain DPO
    log_every: int = Field(5, ge=1)
    device: Literal["auto", "cpu", "gpu"] = "auto"
    bf16_on_gpu: bool = True
    lock_file: str = "var/rlhf.lock"
    state_file: str = "var/rlhf/last_refresh.json"
    refresh_runner: Literal["dvc", "direct"] = "dvc"  # dvc: `dvc exp run`; direct: the stages in-process
    gate: RLHFGateConfig = RLHFGateConfig()
    filter: RLHFFilterConfig = RLHFFilterConfig()
    loop: RLHFLoopConfig = RLHFLoopConfig()


class RLHFParams(FeedbackParams):
    """params.yaml with every section: the schema `ownllm` loads when all three packages are installed."""

    rlhf: RLHFConfig = RLHFConfig()


def load_rlhf_params(path: str | Path = "params.yaml") -> RLHFParams:
    """``load_params`` typed for this package (and correct even where the entry points are not installed)."""
    return load_params(path, RLHFParams)
