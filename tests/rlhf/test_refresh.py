"""The refresh job: does the work once, then "nothing to do" until new feedback arrives."""

from __future__ import annotations

import pytest

from rlhf.refresh import read_state, refresh
from rlhf_fixtures import make_store, rlhf_params


def test_empty_store_is_nothing_to_do(tmp_path):
    params = rlhf_params(tmp_path, tmp_path / "no-model")
    url = make_store(tmp_path, tmp_path / "no-model", [])
    out = refresh(params, url)
    assert out.status == "nothing_to_do" and out.exit_code == 0
    assert not (tmp_path / "models").exists() and read_state(params.rlhf.state_file) == {}


def test_same_snapshot_as_last_refresh_is_nothing_to_do(tmp_path):
    from rlhf.snapshot import take_snapshot
    from pipeline.tracking import write_json
    from rlhf_fixtures import sample_decisions

    params = rlhf_params(tmp_path, tmp_path / "no-model")
    url = make_store(tmp_path, tmp_path / "no-model", sample_decisions(3))
    digest = take_snapshot(params, url)[0].content_hash
    write_json(params.rlhf.state_file, {"snapshot_hash": digest, "status": "registered", "version": "ft-x"})
    out = refresh(params, url)
    assert out.status == "nothing_to_do"
    assert not (tmp_path / "models").exists() and not (tmp_path / "data/feedback").exists()


def test_dvc_runner_runs_a_named_experiment(tmp_path):
    """`refresh` drives a real `dvc exp run` (here over a stub register stage, in a scratch repo)."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    from rlhf.refresh import _run_dvc

    dvc = shutil.which("dvc") or os.path.join(os.path.dirname(sys.executable), "dvc")
    repo = tmp_path / "repo"
    repo.mkdir()
    env = {**os.environ, "PATH": f"{os.path.dirname(dvc)}:{os.environ['PATH']}"}
    run = lambda *c: subprocess.run(c, cwd=repo, env=env, check=True, capture_output=True)  # noqa: E731
    run("git", "init", "-q")
    run("git", "config", "user.email", "t@example.com")
    run("git", "config", "user.name", "t")
    run(dvc, "init", "-q")
    stub = ("import json, os; os.makedirs('reports', exist_ok=True); json.dump({'registered': True, "
            "'version': 'ft-stub', 'reason': 'gate passed', 'lineage': {}, 'exp': os.environ['OWNLLM_EXP_NAME']}, "
            "open('reports/rlhf_register.json', 'w'))")
    (repo / "stub.py").write_text(stub + "\n")
    (repo / "dvc.yaml").write_text(
        f"stages:\n  register:\n    cmd: {sys.executable} stub.py\n"
        "    metrics:\n      - reports/rlhf_register.json:\n          cache: false\n")
    (repo / "params.yaml").write_text("seed: 1\n")
    run("git", "add", "-A")
    run("git", "commit", "-qm", "init")

    params = rlhf_params(tmp_path, tmp_path / "no-model")
    params = params.model_copy(update={"tracking": params.tracking.model_copy(update={"reports_dir": str(repo / "reports")})})
    old_path = os.environ["PATH"]
    os.environ["PATH"] = env["PATH"]
    try:
        result = _run_dvc(params, "rlhf-abc123", repo)
    finally:
        os.environ["PATH"] = old_path
    assert result["registered"] and result["exp"] == "rlhf-abc123"
    listed = subprocess.run([dvc, "exp", "list", "--name-only"], cwd=repo, env=env, capture_output=True, text=True)
    assert "rlhf-abc123" in listed.stdout
    assert json.loads((repo / "reports/rlhf_register.json").read_text())["version"] == "ft-stub"
