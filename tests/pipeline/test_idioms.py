"""Greedy completions of stdlib idioms: the plausibility check, and the report on a real tiny model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipeline.config import parse_params
from pipeline.config import ParamsError
from pipeline.eval.idioms import completed_line, parses, plausible, run_idioms

SOURCES = {"sources": [{"name": "x", "kind": "dir", "path": "."}]}  # required by the schema, unused here


@pytest.mark.parametrize("prompt, completion", [
    ("import os\nimport", " sys\nimport re\n"),
    ("def __init__(self", "):\n        self.x = 1\n"),
    ("def __init__(self", ", name, value=None):\n"),
    ("for i in range(", "len(items)):\n"),
    ("with open(path) as f:", "\n    data = f.read()\n"),  # judged on the body line it writes next
    ("if __name__ ==", " '__main__':\n    main()\n"),
    ("try:\n    import json\nexcept", " ImportError:\n"),
    ("raise ValueError(", "'bad value: %r' % (x,))\n"),
])
def test_plausible_completions(prompt, completion):
    assert plausible(prompt, completion)


@pytest.mark.parametrize("prompt, completion, why", [
    ("import os\nimport", " import sys\n", "import import"),
    ("def __init__(self", "._._._._._._._._._._._._", "never ends the line"),
    ("def __init__(self", "._._._\n", "attribute in a parameter list"),
    ("for i in range(", "10)\n", "no colon"),
    ("for i in range(", "10):", "line not finished"),
    ("with open(path) as f:", "\n    \n   \n", "nothing but blanks"),
    ("with open(path) as f:", "\ndata = 1\n", "body not indented"),
    ("if __name__ ==", "\n", "nothing written"),
    ("class Error(", "000000000000\n", "unclosed bracket"),
])
def test_implausible_completions(prompt, completion, why):
    assert not plausible(prompt, completion), why


def test_the_judged_line_is_the_first_one_with_text():
    assert completed_line("with open(p) as f:", "\n\n    x = 1\n    y = (\n") == "with open(p) as f:\n\n    x = 1"
    assert completed_line("x =", "  ") is None
    assert parses("class A(Exception):")  # a trailing block opener gets a body
    assert not parses("")
    assert not parses("x = '\0'\x00")


def test_prompts_must_end_at_a_token_boundary():
    ok = parse_params({"data": SOURCES, "eval": {"idioms": {"prompts": ["import os\nimport", "def f("]}}})
    assert ok.eval.idioms.prompts == ["import os\nimport", "def f("]
    for prompts, msg in [(["import os\nimport "], "ends in whitespace"), (["  "], "empty prompt"),
                         ([], "at least one prompt")]:
        with pytest.raises(ParamsError, match=msg):
            parse_params({"data": SOURCES, "eval": {"idioms": {"prompts": prompts}}})


def _params(tmp_path, model_dir, prompts=None):
    cfg = {"max_new_tokens": 12}
    if prompts is not None:
        cfg["prompts"] = prompts
    return parse_params({"data": SOURCES, "eval": {"out": str(tmp_path / "reports"), "model": str(model_dir), "idioms": cfg}})


def test_report_on_a_real_model_is_consistent_and_deterministic(tmp_path, tiny_model_dir):
    params = _params(tmp_path, tiny_model_dir)
    summary = run_idioms(params, "tiny", str(tiny_model_dir))
    out = tmp_path / "reports" / "tiny"
    report = json.loads((out / "idioms.json").read_text())
    rows = [json.loads(line) for line in (out / "idioms_results.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == params.eval.idioms.prompts
    assert report["prompts"] == len(rows) == 16
    for r in rows:  # every verdict is the checker's verdict on what the model wrote
        assert r["plausible"] == plausible(r["prompt"], r["completion"])
        assert r["completion"]  # greedy for 12 tokens always writes something
    assert report["plausible"] == sum(r["plausible"] for r in rows) == summary["plausible"]
    first = {f.name: f.read_bytes() for f in out.iterdir()}
    run_idioms(params, "tiny", str(tiny_model_dir))
    assert {f.name: f.read_bytes() for f in out.iterdir()} == first


def test_cli_names_a_bad_prompt(tmp_path, tiny_model_dir):
    import yaml

    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump({"data": SOURCES, "eval": {"out": str(tmp_path / "reports"), "idioms": {"prompts": ["import os\n"]}}}))
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "eval", "idioms", "--params", str(p),
                        "--model", str(tiny_model_dir)], capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert "'import os\\n' ends in whitespace" in r.stderr
    assert not (tmp_path / "reports").exists()  # nothing half-written
