"""Pluggable benchmarks: a JavaScript benchmark written here, run with Node through the sandbox."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import parse_params
from pipeline.eval.benchmarks import build_program, builtin_runtimes, load_benchmark, load_runtimes, run_benchmark

pytestmark = pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
OWNLLM = str(Path(sys.executable).parent / "ownllm")

ASSERT_JS = "const assert = require('assert');\n"
JS_PROBLEMS = [
    {"task_id": "js/add", "language": "javascript", "entry_point": "add",
     "prompt": "function add(a, b) {\n", "canonical_solution": "  return a + b;\n}\n",
     "tests": ASSERT_JS + "assert.strictEqual(add(2, 3), 5);\nassert.strictEqual(add(-1, 1), 0);\n"},
    {"task_id": "js/reverse", "language": "javascript", "entry_point": "reverse",
     "prompt": "// Reverse a string.\nfunction reverse(s) {\n", "canonical_solution": "  return s.split('').reverse().join('');\n}\n",
     "tests": ASSERT_JS + "assert.strictEqual(reverse('abc'), 'cba');\nassert.strictEqual(reverse(''), '');\n"},
    {"task_id": "js/max", "language": "javascript", "entry_point": "max",
     "prompt": "function max(xs) {\n", "canonical_solution": "  return xs.reduce((a, b) => (b > a ? b : a));\n}\n",
     "tests": ASSERT_JS + "assert.strictEqual(max([3, 9, 2]), 9);\n"},
    {"task_id": "js/obj", "language": "javascript", "entry_point": "keys",
     "prompt": "function keys(o) {\n", "canonical_solution": "  return Object.keys(o).sort();\n}\n",
     "tests": ASSERT_JS + "assert.deepStrictEqual(keys({b: 1, a: {c: 2}}), ['a', 'b']);\n"},
]
PY_PROBLEM = {"task_id": "py/square", "language": "python", "entry_point": "square", "prompt": "def square(x):\n",
              "canonical_solution": "    return x * x\n", "tests": "assert square(3) == 9\n"}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture()
def bench(tmp_path):
    return write_jsonl(tmp_path / "minijs.jsonl", JS_PROBLEMS + [PY_PROBLEM])


def make_params(tmp_path):
    return parse_params({"data": {"sources": [{"name": "x", "kind": "dir", "path": str(tmp_path)}]},
                         "eval": {"out": str(tmp_path / "reports"), "sandbox": {"timeout_s": 10, "cpu_seconds": 10},
                                  "humaneval": {"k": [1, 2], "max_new_tokens": 16, "batch_size": 4}}})


def test_canonical_solutions_pass_in_both_languages(tmp_path, bench):
    summary = run_benchmark(make_params(tmp_path), "m", "unused", str(bench), canonical=True)
    assert summary["pass@1"] == 1.0 and summary["problems"] == 5
    assert summary["per_language"] == {"javascript": {"pass@1": 1.0, "problems": 4},
                                       "python": {"pass@1": 1.0, "problems": 1}}
    assert json.loads((tmp_path / "reports" / "m" / "minijs.json").read_text()) == summary


def test_broken_and_hostile_samples_fail_through_the_cli(tmp_path, bench):
    samples = write_jsonl(tmp_path / "samples.jsonl", [
        {"task_id": "js/add", "completion": "  return a - b;\n}\n"},           # wrong
        {"task_id": "js/add", "completion": JS_PROBLEMS[0]["canonical_solution"]},  # right
        {"task_id": "js/reverse", "completion": "  return s;\n"},              # syntax error: no brace
        {"task_id": "js/max", "completion": "  while (true) {}\n}\n"},          # never returns
        {"task_id": "js/obj", "completion": "  require('fs').writeFileSync('/etc/owned', 'x');\n  return Object.keys(o).sort();\n}\n"},
        "not json",
    ])
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"data": {"sources": [{"name": "x", "kind": "dir", "path": str(tmp_path)}]},
                                      "eval": {"out": str(tmp_path / "reports"),
                                               "sandbox": {"timeout_s": 4, "cpu_seconds": 4},
                                               "humaneval": {"k": [1]}}}))
    proc = subprocess.run([OWNLLM, "eval", "run", "--params", str(params), "--benchmark", str(bench),
                           "--samples", str(samples), "--name", "cand"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "reports" / "cand" / "minijs.json").read_text())
    # add: 1 of 2 samples pass; reverse, max, obj fail; the python problem had no samples.
    assert report["per_language"] == {"javascript": {"pass@1": pytest.approx(0.5 / 4), "problems": 4}}
    assert report["skipped_samples"] == {"invalid_json": 1}
    assert not Path("/etc/owned").exists()
    results = [json.loads(line) for line in (tmp_path / "reports" / "cand" / "minijs_results.jsonl").open()]
    assert [r["status"] for r in results if r["task_id"] == "js/max"] == ["timeout"]


def test_bad_problems_are_skipped_and_counted(tmp_path):
    path = write_jsonl(tmp_path / "b.jsonl", JS_PROBLEMS[:1] + [
        "{oops", {"task_id": "x", "language": "javascript"}, JS_PROBLEMS[0],
        {**PY_PROBLEM, "task_id": "c/1", "language": "cobol"}])
    bench = load_benchmark(path, builtin_runtimes())
    assert [p["task_id"] for p in bench.problems] == ["js/add"]
    assert dict(bench.skipped) == {"invalid_json": 1, "missing_fields": 1, "duplicate_task_id": 1,
                                   "no_runtime:cobol": 1}
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_benchmark(tmp_path / "missing.jsonl", builtin_runtimes())


def test_runtime_specs_are_pluggable(tmp_path):
    """A new 'language' from a runtimes file: Node in ES-module form with its own harness template."""
    spec = tmp_path / "runtimes.yaml"
    spec.write_text(yaml.safe_dump({"javascript-esm": {
        "file": "main.mjs", "command": ["node", "{file}"], "memory_mb": 4096,
        "template": "{prompt}{completion}\nimport assert from 'node:assert';\n{tests}\nconsole.log('checked {entry_point}');\n"}}))
    runtimes = load_runtimes(str(spec))
    assert {"python", "javascript", "javascript-esm"} <= set(runtimes)
    problem = {"task_id": "esm/1", "language": "javascript-esm", "entry_point": "twice",
               "prompt": "export function twice(x) {\n", "canonical_solution": "  return 2 * x; // {tests} stays literal\n}\n",
               "tests": "assert.strictEqual(twice(4), 8);"}
    assert "// {tests} stays literal" in build_program(runtimes["javascript-esm"], problem, problem["canonical_solution"])
    bench = write_jsonl(tmp_path / "esm.jsonl", [problem])
    summary = run_benchmark(make_params(tmp_path), "m", "unused", str(bench), runtimes_file=str(spec), canonical=True)
    assert summary["pass@1"] == 1.0
    bad = tmp_path / "bad.yaml"
    bad.write_text("ruby: {command: ruby}\n")
    with pytest.raises(ValueError, match="ruby"):
        load_runtimes(str(bad))


def test_generation_with_a_real_model(tmp_path, bench, tiny_model_dir):
    summary = run_benchmark(make_params(tmp_path), "tiny", str(tiny_model_dir), str(bench))
    assert summary["samples"] == 5 and set(summary["per_language"]) == {"javascript", "python"}
    assert 0.0 <= summary["pass@1"] <= 1.0
