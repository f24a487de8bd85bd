"""The refresh job: does the work once, then "nothing to do" until new feedback arrives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from rlhf.refresh import read_state, refresh
from rlhf_fixtures import make_store, rlhf_params, sample_decisions


def test_empty_store_is_nothing_to_do(tmp_path):
    params = rlhf_params(tmp_path, tmp_path / "no-model")
    url = make_store(tmp_path, tmp_path / "no-model", [])
    out = refresh(params, url)
    assert out.status == "nothing_to_do" and out.exit_code == 0
    assert not (tmp_path / "models").exists() and read_state(params.rlhf.state_file) == {}


def test_same_snapshot_as_last_refresh_is_nothing_to_do(tmp_path):
    from rlhf.snapshot import take_snapshot
    from pipeline.tracking import write_json

    params = rlhf_params(tmp_path, tmp_path / "no-model")
    url = make_store(tmp_path, tmp_path / "no-model", sample_decisions(3))
    digest = take_snapshot(params, url)[0].content_hash
    write_json(params.rlhf.state_file, {"snapshot_hash": digest, "status": "registered", "version": "ft-x"})
    out = refresh(params, url)
    assert out.status == "nothing_to_do"
    assert not (tmp_path / "models").exists() and not (tmp_path / "data/feedback").exists()


def test_dvc_runner_runs_a_named_experiment(tmp_path):
    """`refresh` drives a real `dvc exp run` (here over a stub register stage, in a scratch repo), telling its
    stages that this is the production path (the snapshot's parent: the version serving everyone)."""
    from rlhf.refresh import _run_dvc

    repo = tmp_path / "repo"
    stub = ("import json, os; os.makedirs('reports', exist_ok=True); json.dump({'registered': True, "
            "'version': 'ft-stub', 'reason': 'gate passed', 'lineage': {}, 'exp': os.environ['OWNLLM_EXP_NAME'], "
            "'parent_from': os.environ.get('OWNLLM_RLHF_PARENT')}, "
            "open('reports/rlhf_register.json', 'w'))")
    (tmp_path / "stub.py").write_text(stub + "\n")
    _scratch_dvc_repo(repo, f"{sys.executable} {tmp_path / 'stub.py'}")
    params = rlhf_params(tmp_path, tmp_path / "no-model")
    params = params.model_copy(update={"tracking": params.tracking.model_copy(update={"reports_dir": str(repo / "reports")})})
    result = _run_dvc(params, "rlhf-abc123", repo)
    assert result["registered"] and result["exp"] == "rlhf-abc123"
    # The production path: its stages' `ownllm rlhf snapshot` tunes from the version serving everyone.
    assert result["parent_from"] == "production"
    listed = subprocess.run([str(Path(sys.executable).parent / "dvc"), "exp", "list", "--name-only"], cwd=repo,
                            capture_output=True, text=True)
    assert "rlhf-abc123" in listed.stdout
    assert json.loads((repo / "reports/rlhf_register.json").read_text())["version"] == "ft-stub"

ROOT = Path(__file__).resolve().parents[2]
CRON_PATH = "PATH=/usr/bin:/bin"  # cron's and systemd's default: the venv's bin/ is not on it


def _refresh_in_cron_env(tmp_path: Path, python: str, repo: Path, pythonpath: str) -> subprocess.CompletedProcess:
    """`cd REPO && <python> -m ownllm rlhf refresh` with nothing of this process's environment."""
    params = rlhf_params(tmp_path, tmp_path / "no-model", refresh_runner="dvc")
    params = params.model_copy(update={"tracking": params.tracking.model_copy(update={"reports_dir": str(repo / "reports")})})
    params_file = tmp_path / "params-refresh.yaml"
    params_file.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    url = make_store(tmp_path, tmp_path / "no-model", sample_decisions(3))
    cmd = ["env", "-i", CRON_PATH, f"HOME={tmp_path}", f"PYTHONPATH={pythonpath}", python, "-c",
           "import sys; from pipeline.cli import main; sys.exit(main(sys.argv[1:]))",
           "rlhf", "refresh", "--params", str(params_file), "--db-url", url]
    return subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=300)


def _scratch_dvc_repo(repo: Path, stage_cmd: str) -> None:
    dvc = str(Path(sys.executable).parent / "dvc")
    repo.mkdir()
    run = lambda *c: subprocess.run(c, cwd=repo, check=True, capture_output=True)  # noqa: E731
    run("git", "init", "-q")
    run("git", "config", "user.email", "t@example.com")
    run("git", "config", "user.name", "t")
    run(dvc, "init", "-q")
    (repo / "dvc.yaml").write_text(f"stages:\n  register:\n    cmd: {stage_cmd}\n"
                                   "    metrics:\n      - reports/rlhf_register.json:\n          cache: false\n")
    (repo / "params.yaml").write_text("seed: 1\n")
    run("git", "add", "-A")
    run("git", "commit", "-qm", "init")


def test_refresh_under_cron_finds_dvc_and_ownllm_in_its_own_environment(tmp_path):
    """The documented cron line (`cd /srv/ownllm && .venv/bin/ownllm rlhf refresh`) with PATH=/usr/bin:/bin:
    DVC comes from the venv that runs ownllm, and the stage DVC runs finds `ownllm` and `python` there too."""
    repo = tmp_path / "repo"
    stub = ("import json, os; os.makedirs('reports', exist_ok=True); json.dump({'registered': True, "
            "'version': 'ft-cron', 'reason': 'gate passed', 'lineage': {}}, open('reports/rlhf_register.json', 'w'))")
    (tmp_path / "stub.py").write_text(stub + "\n")
    _scratch_dvc_repo(repo, f"ownllm --help > /dev/null && python {tmp_path / 'stub.py'}")
    proc = _refresh_in_cron_env(tmp_path, sys.executable, repo, str(ROOT))
    assert proc.returncode == 0, proc.stderr
    assert "registered" in proc.stderr and "ft-cron" in proc.stderr
    assert json.loads((repo / "reports/rlhf_register.json").read_text())["version"] == "ft-cron"


def test_a_missing_tool_is_one_line_not_a_traceback(tmp_path):
    """An interpreter whose bin/ holds no `dvc` (a bare python with ownllm's packages on PYTHONPATH), and
    no dvc on cron's PATH: `refresh` says in one line what is missing and exits 2."""
    bare = tmp_path / "bare/bin"
    bare.mkdir(parents=True)
    (bare / "python").symlink_to(os.path.realpath(sys.executable))
    repo = tmp_path / "repo"
    _scratch_dvc_repo(repo, "true")
    site_packages = next(p for p in sys.path if p.endswith("site-packages") and Path(p, "dvc").is_dir())
    proc = _refresh_in_cron_env(tmp_path, str(bare / "python"), repo, f"{ROOT}:{site_packages}")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    error = [line for line in proc.stderr.splitlines() if line.startswith("ownllm: error:")]
    assert len(error) == 1 and "`dvc` not found in" in error[0] and str(bare) in error[0], proc.stderr
