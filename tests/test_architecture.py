"""The layers of ARCHITECTURE.md hold: import-linter's contracts in pyproject.toml ([tool.importlinter])."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
    """rlhf → feedback → pipeline only, and no import cycle among pipeline's modules and packages."""
    lint = Path(sys.executable).parent / "lint-imports"
    env = {**os.environ, "PYTHONPATH": str(REPO), "NO_COLOR": "1"}
    proc = subprocess.run([str(lint), "--no-cache", "--config", str(REPO / "pyproject.toml")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert "Contracts: 2 kept, 0 broken." in proc.stdout, proc.stdout + proc.stderr
    assert proc.returncode == 0
