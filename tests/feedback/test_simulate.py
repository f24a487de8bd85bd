"""`ownllm feedback simulate` and `report` end to end: held-out stdlib files → HTTP gateway → store → reports."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
import yaml

from feedback.simulate import accepts, closeness, cursor_seed, cursors, decide, pick_files
from pipeline.cli import main as ownllm
from pipeline.config import SimulateConfig
from pipeline.data.records import DOC_SCHEMA, make_doc, split_of, to_table, write_docs

REPO = Path(__file__).resolve().parents[2]
STDLIB = Path(sysconfig.get_paths()["stdlib"])


def report_files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (the simulate stage writes a subfolder), by relative path."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def stdlib_files(names: list[str]) -> dict[str, str]:
    return {n: (STDLIB / n).read_text(encoding="utf-8") for n in names}

FILES = ["textwrap.py", "shlex.py", "fnmatch.py", "glob.py", "bisect.py", "heapq.py", "colorsys.py", "string.py",
         "numbers.py", "reprlib.py", "copy.py", "queue.py", "base64.py", "calendar.py", "cmd.py", "code.py"]


def test_accept_rule():
    truth = "    return a + b\nprint(add(1, 2))"
    assert accepts("return  a +  b\n", "return a + b\nx", 50)  # first line equal after whitespace normalisation
    assert accepts("    return a + b  # sum", truth, 9)  # "return a + b": 9 non-blank characters in common
    assert not accepts("    return a + b  # sum", truth, 10)
    assert accepts("    return a - b", truth, 7)  # "return a ": 7
    assert not accepts("    return a - b", truth, 8)
    assert accepts("\treturn a - b", truth, 7)  # indentation is stripped: editors re-indent
    assert not accepts("    return a", truth, 14)
    assert not accepts("   \n", truth, 1) and not accepts("", truth, 1)
    # Whitespace alone never counts: 8 matching spaces of indentation are 0 characters in common.
    assert not accepts("        x = 1", "        return y", 1)
    assert not accepts(" * a", " * b", 2) and accepts(" * b", " * bc", 2)  # "* " is one non-blank character


def test_decision_accepts_the_closest_passing_choice_and_rejects_the_rest():
    truth = "    return a + b\nprint(add(1, 2))"
    texts = ["    return a", "    ret", "    return a + b  # sum", "    pass"]
    assert closeness(texts[2], truth) > closeness(texts[0], truth) > closeness(texts[1], truth)
    assert decide(texts, truth, 9) == ["rejected", "rejected", "accepted", "rejected"]
    assert decide(texts, truth, 40) == ["rejected"] * 4  # none passes: all rejected
    # First-line equality outranks a tie in common prefix; on a full tie the lowest index wins.
    assert decide(["f(x)y", "f(x)  "], "f(x)\nz", 50) == ["rejected", "accepted"]
    assert decide(["f(x)a", "f(x)b"], "f(x)c", 4) == ["accepted", "rejected"]
    # A duplicate of the accepted text gets no event, so no text is both accepted and rejected.
    assert decide(["x", "return a + b", "return a + b"], truth, 9) == ["rejected", "accepted", None]
    assert decide(["return a + b"], truth, 9) == ["accepted"]
    assert cursor_seed(11, 0) != cursor_seed(11, 1) != cursor_seed(12, 1) and cursor_seed(11, 3) == cursor_seed(11, 3)


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


def write_sim_params(tmp_path: Path, model_dir: Path, simulate: dict) -> Path:
    docs = [make_doc("stdlib", name, "python", text) for name, text in stdlib_files(FILES).items()]
    write_docs(to_table(docs, DOC_SCHEMA), tmp_path / "dedup")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["dedup"]["out"] = str(tmp_path / "dedup")
    params.setdefault("shards", {})["val_frac"] = 0.5
    params.setdefault("serve", {}).update(model_dir=str(model_dir), db_url=f"sqlite:///{tmp_path / 'fb.db'}")
    params.setdefault("feedback", {}).update(reports_dir=str(tmp_path / "reports" / "feedback"), simulate=simulate)
    params.setdefault("tracking", {})["reports_dir"] = str(tmp_path / "reports")
    params.setdefault("rlhf", {})["snapshot_dir"] = str(tmp_path / "data" / "feedback")
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    assert sum(split_of(d["id"], 0.5) == "val" for d in docs) >= 4
    return path


@pytest.fixture
def sim_params(tmp_path, tiny_model_dir):
    simulate = {"users": 3, "files": 4, "cursors_per_file": 2, "max_tokens": 8, "bounties": 3, "seed": 3,
                "choices": 1}
    return write_sim_params(tmp_path, tiny_model_dir, simulate), tmp_path


def store_rows(db_url: str) -> list[tuple]:
    """The simulated traffic as the store holds it, minus random ids and times: (user, choice, texts, event)."""
    from sqlalchemy import select

    from feedback.db import session_factory
    from feedback.models import Completion, FeedbackEvent, User

    with session_factory(db_url)() as s:
        rows = s.execute(select(Completion.request_id, User.name, Completion.choice_index, Completion.prompt,
                                Completion.suffix, Completion.completion, FeedbackEvent.kind)
                         .join(User, User.id == Completion.user_id)
                         .outerjoin(FeedbackEvent, FeedbackEvent.completion_id == Completion.id)
                         .order_by(Completion.id)).all()
    return [tuple(r)[1:-1] + (r[-1].value if r[-1] else None, r[0]) for r in rows]


def test_simulate_fills_the_store_and_reruns_identically(sim_params, capsys):
    path, tmp = sim_params
    assert ownllm(["feedback", "simulate", "--params", str(path)]) == 0
    summary = json.loads((tmp / "reports" / "feedback" / "simulate.json").read_text())
    reports = tmp / "reports" / "feedback"
    first = report_files(reports)
    assert summary["cursors"] == 8 and summary["files"] == 4 and summary["model"] == "base"
    assert summary["choices"] == 1 and sum(summary["choice_events"].values()) == 8
    assert 0 <= summary["accepted"] <= 8 and summary["bounties"]["derived"] == 3
    assert summary["bounties"]["added"] == 3
    acceptance = json.loads(first["simulated/acceptance.json"])
    cell = acceptance["by_version_language"][0]
    assert (cell["model"], cell["language"], cell["served"], cell["decided"]) == ("base", "python", 8, 8)
    assert cell["accepted"] == summary["accepted"] and 0 <= cell["ci95"][0] <= cell["ci95"][1] <= 1
    assert first["simulated/acceptance.png"].startswith(b"\x89PNG")

    from feedback import store
    from feedback.db import session_factory

    with session_factory(f"sqlite:///{tmp / 'fb.db'}")() as s:
        counts = store.counts(s)
    assert (counts["completions"], counts["feedback_events"], counts["bounties"]) == (8, 8, 3)

    # A rerun replaces the simulated traffic: same store counts, byte-identical reports.
    assert ownllm(["feedback", "simulate", "--params", str(path)]) == 0
    again = report_files(reports)
    assert again == first
    with session_factory(f"sqlite:///{tmp / 'fb.db'}")() as s:
        assert store.counts(s)["completions"] == 8

    capsys.readouterr()
    assert ownllm(["feedback", "report", "--params", str(path), "--days", "1"]) == 0
    out = capsys.readouterr().out
    assert "base" in out and "python" in out and "95% CI" in out


def test_several_choices_make_preference_pairs_deterministically(tmp_path, tiny_model_dir):
    """choices=8: per cursor one request, eight sampled suggestions, the closest passing one accepted and the
    rest rejected; the snapshot pairs them; a rerun leaves the same store and the same reports."""
    from collections import defaultdict

    from pipeline.config import load_params
    from rlhf.snapshot import build_snapshot, load_store

    # A low bar, so that the tiny test model (a few seconds of training) gets some suggestions accepted.
    simulate = {"users": 2, "files": 4, "cursors_per_file": 4, "max_tokens": 8, "bounties": 0, "seed": 3,
                "choices": 8, "temperature": 1.0, "min_common_prefix": 1}
    path = write_sim_params(tmp_path, tiny_model_dir, simulate)
    db_url = f"sqlite:///{tmp_path / 'fb.db'}"
    assert ownllm(["feedback", "simulate", "--params", str(path)]) == 0
    summary = json.loads((tmp_path / "reports" / "feedback" / "simulate.json").read_text())
    reports = report_files(tmp_path / "reports" / "feedback")
    rows = store_rows(db_url)
    assert len(rows) == 16 * 8 and summary["cursors"] == 16 and summary["choices"] == 8

    by_request: dict[str, list[tuple]] = defaultdict(list)
    for r in rows:
        by_request[r[-1]].append(r)
    assert len(by_request) == 16 and all(sorted(r[1] for r in v) == list(range(8)) for v in by_request.values())
    for v in by_request.values():  # one decision per cursor: at most one accepted choice, rejected otherwise
        events = [r[5] for r in v]
        assert set(events) <= {"accepted", "rejected", None} and events.count("accepted") <= 1
        if "accepted" not in events:  # nothing passed: every suggestion was dismissed
            assert events == ["rejected"] * len(events)
        accepted = [r[4] for r in v if r[5] == "accepted"]
        assert all(r[5] is not None or r[4] in accepted for r in v)  # no event only for a duplicate of it
    mixed = [v for v in by_request.values() if {"accepted", "rejected"} <= {r[5] for r in v}]
    assert mixed, "no cursor had one suggestion accepted and another rejected"
    assert summary["accepted"] == len([v for v in by_request.values() if any(r[5] == "accepted" for r in v)])
    assert summary["choice_events"]["accepted"] == summary["accepted"]

    # The snapshot turns an accepted and a rejected choice of the same request into a DPO pair.
    params = load_params(path).model_copy()
    from feedback.db import session_factory

    with session_factory(db_url)() as s:
        decisions, bounties, _ = load_store(s)
    snap = build_snapshot(decisions, bounties, params)
    assert snap.pairs and all(p["chosen"] != p["rejected"] for p in snap.pairs)
    chosen = {r[4] for v in mixed for r in v if r[5] == "accepted"}
    assert {p["chosen"] for p in snap.pairs} <= chosen

    # Seeded sampling: a rerun serves the same suggestions and records the same decisions.
    assert ownllm(["feedback", "simulate", "--params", str(path)]) == 0
    assert [r[:-1] for r in store_rows(db_url)] == [r[:-1] for r in rows]
    assert report_files(tmp_path / "reports" / "feedback") == reports
