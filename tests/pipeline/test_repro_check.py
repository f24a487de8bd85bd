"""`ownllm repro check` on a real git + DVC workspace: a data stage and a "training" stage whose bits depend on its
numerics (an environment variable standing for the machine) and, when asked, on a determinism bug.

The committed revision carries dvc.lock and the small DVC outputs that are not cached (the numerics fingerprint
and the metrics), as a real repository commits them. Each case rebuilds with `dvc repro` and checks the verdicts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import parse_params
from pipeline.repro.check import (DETERMINISM_BUG, FOLLOWS_UPSTREAM, IDENTICAL, INPUTS_CHANGED, NUMERICS_DIFFER,
                                  check)

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

PREP = """import pathlib
pathlib.Path("data").mkdir(exist_ok=True)
pathlib.Path("data/corpus.txt").write_text("".join(f"line {i}\\n" for i in range(100)))
"""
# The "training": its weights depend on the machine's numerics (MACHINE) and, with BUG set, on the clock; its val
# loss moves by VAL_DRIFT. It writes the fingerprint where the real train stage does.
TRAIN = """import hashlib, json, os, pathlib, time
machine = os.environ.get("MACHINE", "a")
corpus = pathlib.Path("data/corpus.txt").read_text()
pathlib.Path("model").mkdir(exist_ok=True)
pathlib.Path("model/config.json").write_text('{"layers": 2}')
noise = str(time.time_ns()) if os.environ.get("BUG") else ""
pathlib.Path("model/weights.bin").write_bytes(hashlib.sha256((corpus + machine + noise).encode()).digest())
pathlib.Path("reports").mkdir(exist_ok=True)
pathlib.Path("reports/numerics.json").write_text(json.dumps({"mode": "portable", "aten_cpu_capability": machine}))
val = 4.292 + float(os.environ.get("VAL_DRIFT", "0"))
pathlib.Path("reports/train.json").write_text(json.dumps({"val_loss": val, "steps": 10}))
"""


def run(cmd: list[str], cwd: Path, **env: str) -> str:
    full = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", **env}
    proc = subprocess.run(cmd, cwd=cwd, env=full, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    ws = tmp_path_factory.mktemp("repro")
    (ws / "prep.py").write_text(PREP)
    (ws / "train.py").write_text(TRAIN)
    (ws / "params.yaml").write_text(yaml.safe_dump({
        "seed": 1, "data": {"sources": [{"name": "s", "kind": "dir", "path": "."}]},
        "repro": {"tolerances": {"reports/train.json:val_loss": 0.02}}}))
    (ws / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "prep": {"cmd": "python prep.py", "deps": ["prep.py"], "outs": ["data"]},
        "train": {"cmd": "python train.py", "deps": ["train.py", "data"], "params": ["seed"],
                  "outs": ["model", {"reports/numerics.json": {"cache": False}}],
                  "metrics": [{"reports/train.json": {"cache": False}}]},
    }}, sort_keys=False))
    run(["git", "init", "-q"], ws)
    run(["git", "config", "user.email", "t@example.com"], ws)
    run(["git", "config", "user.name", "t"], ws)
    run(["dvc", "init", "-q"], ws)
    run(["dvc", "repro", "-q"], ws)
    run(["git", "add", "-A"], ws)
    run(["git", "commit", "-qm", "the run"], ws)
    return ws


def verdicts(ws: Path) -> dict[str, object]:
    params = parse_params(yaml.safe_load((ws / "params.yaml").read_text()), str(ws / "params.yaml"))
    return {r.stage: r for r in check(params, ws)}


def rebuild(ws: Path, **env: str) -> None:
    run(["dvc", "repro", "-q", "-f"], ws, **env)


def test_identical_rebuild(workspace):
    rebuild(workspace)
    res = verdicts(workspace)
    assert {s: r.verdict for s, r in res.items()} == {"prep": IDENTICAL, "train": IDENTICAL}
    assert all(r.ok for r in res.values())


def test_same_fingerprint_different_bits_is_a_determinism_bug(workspace):
    rebuild(workspace, BUG="1")
    res = verdicts(workspace)
    assert res["prep"].verdict == IDENTICAL
    assert res["train"].verdict == DETERMINISM_BUG and not res["train"].ok
    assert "model/weights.bin (differs)" in res["train"].detail  # the first differing file inside the output
    assert res["train"].differing == ["model"]


def test_other_fingerprint_compares_metrics_within_tolerance(workspace):
    rebuild(workspace, MACHINE="b", VAL_DRIFT="0.01")
    train = verdicts(workspace)["train"]
    assert train.verdict == NUMERICS_DIFFER and train.ok, train
    assert "aten_cpu_capability: a → b" in train.detail
    val = next(m for m in train.metrics if m.metric == "val_loss")
    assert val.committed == pytest.approx(4.292) and val.current == pytest.approx(4.302) and val.ok
    assert not any(m.metric == "steps" for m in train.metrics)  # unchanged and untoleranced: not listed

    rebuild(workspace, MACHINE="b", VAL_DRIFT="0.05")
    train = verdicts(workspace)["train"]
    assert train.verdict == NUMERICS_DIFFER and not train.ok
    assert not next(m for m in train.metrics if m.metric == "val_loss").ok


def test_changed_code_and_upstream_differences_are_named(workspace):
    (workspace / "prep.py").write_text(PREP.replace("range(100)", "range(101)"))
    try:
        rebuild(workspace)
        res = verdicts(workspace)
        assert res["prep"].verdict == INPUTS_CHANGED and "prep.py" in res["prep"].detail
        assert res["train"].verdict == FOLLOWS_UPSTREAM and "prep" in res["train"].detail
    finally:
        (workspace / "prep.py").write_text(PREP)
        rebuild(workspace)


def test_cli_exit_code_and_json(workspace, capsys):
    from pipeline.cli import main

    rebuild(workspace)
    assert main(["repro", "check", "--params", str(workspace / "params.yaml"), "--root", str(workspace)]) == 0
    assert "reproduced" in capsys.readouterr().out
    rebuild(workspace, BUG="1")
    try:
        assert main(["repro", "check", "--params", str(workspace / "params.yaml"), "--root", str(workspace),
                     "--json"]) == 1
        out = json.loads(capsys.readouterr().out)
        assert {r["stage"]: r["verdict"] for r in out}["train"] == DETERMINISM_BUG
        assert main(["repro", "check", "--params", str(workspace / "params.yaml"), "--root", str(workspace),
                     "--rev", "no-such-rev"]) == 2
        assert "no dvc.lock at git revision 'no-such-rev'" in capsys.readouterr().err
    finally:
        rebuild(workspace)
