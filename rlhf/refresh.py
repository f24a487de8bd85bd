"""`ownllm rlhf refresh`: the periodic job — snapshot → sft → dpo → gate → register, once per new feedback.

1. Take the lock (``rlhf.lock``): a second refresh started meanwhile exits at once, saying who runs.
2. Build the snapshot in memory and compare its content hash with the last refresh's
   (``rlhf.state_file``); equal (or an empty store) → "nothing to do", exit 0. Cron-safe.
3. Run the stages: by default as a DVC experiment (``dvc exp run --name rlhf-<hash> register``), so every
   refresh is reproducible and comparable with ``dvc exp show``; ``refresh_runner: direct`` runs the
   same functions in-process (tests, machines without a git checkout).
4. Record the snapshot hash and the outcome. Exit 0 when a version was registered, 1 when the gate
   failed (the comparison table was printed, nothing registered), so cron/systemd report the failure.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from pipeline.cli import UserError
from rlhf.config import RLHFParams
from pipeline.tools import find_tool, tool_env
from pipeline.tracking import say, write_json
from rlhf.lock import RefreshLock

DVC_TARGET = "register"


@dataclass
class RefreshOutcome:
    status: str  # nothing_to_do | registered | gate_failed
    snapshot_hash: str
    version: str | None = None

    @property
    def exit_code(self) -> int:
        return 1 if self.status == "gate_failed" else 0


def read_state(path: str | Path) -> dict:
    p = Path(path)
    return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}


def refresh(params: RLHFParams, db_url: str, runner: str | None = None, repo: str | Path = ".") -> RefreshOutcome:
    from rlhf.snapshot import take_snapshot

    cfg = params.rlhf
    with RefreshLock(cfg.lock_file):
        snap, _ = take_snapshot(params, db_url)
        digest = snap.content_hash
        state = read_state(cfg.state_file)
        if not (snap.sft or snap.pairs or snap.unpaired):
            say("[rlhf refresh] nothing to do: the feedback store holds no usable feedback yet")
            return RefreshOutcome("nothing_to_do", digest)
        if state.get("snapshot_hash") == digest:
            say(f"[rlhf refresh] nothing to do: no new feedback since snapshot {digest[:12]} "
                f"({state.get('status')}, {state.get('version') or 'no version'})")
            return RefreshOutcome("nothing_to_do", digest)
        runner = runner or cfg.refresh_runner
        exp_name = f"rlhf-{digest[:12]}"
        if runner == "dvc":
            result = _run_dvc(params, exp_name, repo)
        else:
            result = run_direct(params, db_url)
        outcome = RefreshOutcome("registered" if result["registered"] else "gate_failed", digest, result.get("version"))
        write_json(cfg.state_file, {"snapshot_hash": digest, "status": outcome.status, "version": outcome.version,
                                    "experiment": exp_name if runner == "dvc" else None})
        return outcome


def _run_dvc(params: RLHFParams, exp_name: str, repo: str | Path) -> dict:
    """``dvc exp run`` up to the register stage; the stages are the same `ownllm rlhf ...` commands.

    DVC comes from ownllm's own environment (cron's PATH lacks the venv), and so do the ``ownllm`` commands
    its stages run."""
    cmd = [find_tool("dvc"), "exp", "run", "--name", exp_name, DVC_TARGET]
    say(f"[rlhf refresh] {' '.join(cmd)}")
    from rlhf.snapshot import PARENT_FROM_ENV

    # The production path tunes from the version serving everyone (`dvc repro` alone pins round 1 to the base).
    proc = subprocess.run(cmd, cwd=repo, env=tool_env({"OWNLLM_EXP_NAME": exp_name, PARENT_FROM_ENV: "production"}))
    if proc.returncode != 0:
        raise UserError(f"`{' '.join(cmd)}` failed with exit code {proc.returncode} (its output is above)")
    return _register_result(params)


def _register_result(params: RLHFParams) -> dict:
    from rlhf.register import STAGE

    p = Path(params.tracking.reports_dir) / f"{STAGE}.json"
    return json.loads(p.read_text(encoding="utf-8"))


def run_direct(params: RLHFParams, db_url: str) -> dict:
    """The DVC stages' work, in-process and in order (what `dvc exp run` runs, minus the bookkeeping)."""
    from rlhf import stages

    stages.snapshot(params, db_url, parent_from="production")
    stages.sft(params)
    stages.preference(params)
    stages.gate(params)
    return stages.register(params, db_url, on_fail="record")
