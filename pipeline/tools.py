"""The command-line tools `ownllm` runs (``dvc``, ``composer``), found in its own environment first.

cron and systemd start ``/srv/ownllm/.venv/bin/ownllm`` with ``PATH=/usr/bin:/bin``: the venv's ``bin/`` is not
on PATH there, so a bare ``subprocess.run(["dvc", ...])`` dies with a ``FileNotFoundError`` traceback. The
tools installed with ownllm live beside the interpreter running it, so look there first, then on PATH, and
say in one line what is missing. Children get the same ``bin/`` first on their PATH, so the ``ownllm ...``
commands a DVC stage runs resolve to this installation too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from pipeline.cli import UserError


class ToolNotFound(UserError):
    """A command-line tool ownllm needs is neither in its environment nor on PATH."""


def env_bin_dir() -> Path:
    """The ``bin/`` of the environment running ownllm (not resolved: a venv's python is a symlink)."""
    return Path(sys.executable).parent


def find_tool(name: str) -> str:
    """The path of ``name``: the environment's own ``bin/`` first, then PATH; else `ToolNotFound`."""
    own = env_bin_dir() / name
    if own.is_file() and os.access(own, os.X_OK):
        return str(own)
    found = shutil.which(name)
    if found:
        return found
    raise ToolNotFound(f"`{name}` not found in {env_bin_dir()} nor on PATH ({os.environ.get('PATH', '')}); "
                       f"install it into ownllm's environment (pip install -r requirements.lock)")


def tool_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment with the environment's ``bin/`` first on PATH, plus ``extra``."""
    path = os.environ.get("PATH", "")
    own = str(env_bin_dir())
    if own not in path.split(os.pathsep):
        path = os.pathsep.join(p for p in (own, path) if p)
    return {**os.environ, "PATH": path, **(extra or {})}


def git_revision(repo: str | Path = ".") -> str | None:
    """The commit checked out in ``repo``; None outside a git checkout or without git (lineage stays optional)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None
