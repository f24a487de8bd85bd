"""`ownllm feedback simulate` and `report` end to end: held-out stdlib files → HTTP gateway → store → reports."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
import yaml

from feedback.simulate import accepts, cursors, pick_files
from pipeline.cli import main as ownllm
from pipeline.config import SimulateConfig
from pipeline.data.records import DOC_SCHEMA, make_doc, split_of, to_table, write_docs

REPO = Path(__file__).resolve().parents[2]
STDLIB = Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(names: list[str]) -> dict[str, str]:
    return {n: (STDLIB / n).read_text(encoding="utf-8") for n in names}

FILES = ["textwrap.py", "shlex.py", "fnmatch.py", "glob.py", "bisect.py", "heapq.py", "colorsys.py", "string.py",
         "numbers.py", "reprlib.py", "copy.py", "queue.py", "base64.py", "calendar.py", "cmd.py", "code.py"]


def test_accept_rule():
    truth = "    return a + b\nprint(add(1, 2))"
    assert accepts("return  a +  b\n", "return a + b\nx", 50)  # first line equal after whitespace normalisation
    assert accepts("    return a + b  # sum", truth, 12)  # 16 common characters >= 12
    assert accepts("    return a - b", truth, 13)  # "    return a " : 13 common characters
    assert not accepts("    return a - b", truth, 14)
    assert not accepts("    return a", truth, 14)
    assert not accepts("   \n", truth, 1) and not accepts("", truth, 1)


def test_cursors_are_deterministic_and_mask_the_line():
    cfg = SimulateConfig(cursors_per_file=3, seed=5)
    doc = {"id": "d1", "lang": "python", "path": "x.py", "content": stdlib_files(["textwrap.py"])["textwrap.py"]}
    a, b = cursors(doc, cfg), cursors(doc, cfg)
    assert a == b and len(a) == 3
    for c in a:
        line = doc["content"].split("\n")[c.line_no]
        assert c.truth.startswith(line) and line not in c.suffix.split("\n")[1:2]
        assert (c.prefix + c.truth).endswith(doc["content"][-50:]) or len(c.prefix) == cfg.max_context_chars
    assert cursors(doc, SimulateConfig(cursors_per_file=3, seed=6)) != a


def test_files_spread_over_languages():
    docs = [{"id": f"{lang}{i}", "lang": lang, "content": "a\nb\nc\nd\ne\nline long enough\n"}
            for lang in ("c", "javascript", "python") for i in range(10)]
    picked = pick_files(docs, SimulateConfig(files=6))
    assert sorted(d["lang"] for d in picked) == ["c", "c", "javascript", "javascript", "python", "python"]


@pytest.fixture
def sim_params(tmp_path, tiny_model_dir):
    docs = [make_doc("stdlib", name, "python", text) for name, text in stdlib_files(FILES).items()]
    write_docs(to_table(docs, DOC_SCHEMA), tmp_path / "dedup")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["dedup"]["out"] = str(tmp_path / "dedup")
    params.setdefault("shards", {})["val_frac"] = 0.5
    params.setdefault("serve", {}).update(model_dir=str(tiny_model_dir), db_url=f"sqlite:///{tmp_path / 'fb.db'}")
    params.setdefault("feedback", {}).update(reports_dir=str(tmp_path / "reports" / "feedback"), simulate={
        "users": 3, "files": 4, "cursors_per_file": 2, "max_tokens": 8, "bounties": 3, "seed": 3})
    params.setdefault("tracking", {})["reports_dir"] = str(tmp_path / "reports")
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    assert sum(split_of(d["id"], 0.5) == "val" for d in docs) >= 4
    return path, tmp_path


def test_simulate_fills_the_store_and_reruns_identically(sim_params, capsys):
    path, tmp = sim_params
    assert ownllm(["feedback", "simulate", "--params", str(path)]) == 0
    summary = json.loads((tmp / "reports" / "feedback" / "simulate.json").read_text())
    first = {p.name: p.read_bytes() for p in (tmp / "reports" / "feedback").iterdir()}
    assert summary["cursors"] == 8 and summary["files"] == 4 and summary["model"] == "base"
    assert 0 <= summary["accepted"] <= 8 and summary["bounties"]["derived"] == 3
    assert summary["bounties"]["added"] == 3
    acceptance = json.loads(first["acceptance.json"])
    cell = acceptance["by_version_language"][0]
    assert (cell["model"], cell["language"], cell["served"], cell["decided"]) == ("base", "python", 8, 8)
    assert cell["accepted"] == summary["accepted"] and 0 <= cell["ci95"][0] <= cell["ci95"][1] <= 1
    assert first["acceptance.png"].startswith(b"\x89PNG")

    from feedback import store
    from feedback.db import session_factory

    with session_factory(f"sqlite:///{tmp / 'fb.db'}")() as s:
        counts = store.counts(s)
    assert (counts["completions"], counts["feedback_events"], counts["bounties"]) == (8, 8, 3)

    # A rerun replaces the simulated traffic: same store counts, byte-identical reports.
    assert ownllm(["feedback", "simulate", "--params", str(path)]) == 0
    again = {p.name: p.read_bytes() for p in (tmp / "reports" / "feedback").iterdir()}
    assert again == first
    with session_factory(f"sqlite:///{tmp / 'fb.db'}")() as s:
        assert store.counts(s)["completions"] == 8

    capsys.readouterr()
    assert ownllm(["feedback", "report", "--params", str(path), "--days", "1"]) == 0
    out = capsys.readouterr().out
    assert "base" in out and "python" in out and "95% CI" in out
