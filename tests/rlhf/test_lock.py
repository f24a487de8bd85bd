"""Two refreshes never run at once: the fcntl lock, across real processes."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from rlhf.lock import LockBusy, RefreshLock

HOLD = """
import sys, time
sys.path.insert(0, {repo!r})
from rlhf.lock import RefreshLock
with RefreshLock({path!r}):
    print("held", flush=True)
    time.sleep(30)
"""


def test_second_holder_is_refused_while_first_runs_then_allowed(tmp_path):
    from pathlib import Path

    path = tmp_path / "var" / "rlhf.lock"
    repo = str(Path(__file__).resolve().parents[2])
    proc = subprocess.Popen([sys.executable, "-c", HOLD.format(repo=repo, path=str(path))], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(LockBusy, match=f"pid {proc.pid}"):
            with RefreshLock(path):
                pass
    finally:
        proc.kill()
        proc.wait()
    # The kernel releases flock when the holder dies, however it dies: no stale lock.
    with RefreshLock(path):
        pass


def test_refresh_refuses_at_once_when_locked(tmp_path):
    from rlhf_fixtures import rlhf_params

    from rlhf.refresh import refresh

    params = rlhf_params(tmp_path, tmp_path / "no-model")
    with RefreshLock(params.rlhf.lock_file):
        t0 = time.monotonic()
        with pytest.raises(LockBusy):
            refresh(params, f"sqlite:///{tmp_path / 'none.db'}")
        assert time.monotonic() - t0 < 5  # refused at once, never waits
