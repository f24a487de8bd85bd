"""`ownllm feedback simulate` and `report` end to end: held-out stdlib files → HTTP gateway → store → reports."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
import yaml

from feedback.simulate import (accepted_length, cursor_columns, cursor_seed, cursors, decide, is_accepted,
                               pick_files, words_in)
from feedback.config import SimulateConfig
from pipeline.cli import main as ownllm
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


def test_partial_accept_stops_at_a_word_boundary_of_what_the_user_types():
    kept = " self.items[key] = value"
    assert accepted_length(" self.items[key] = value", kept) == len(kept)
    assert accepted_length(" self.items[key] = value  # and more", kept) == len(kept)  # accept line
    assert accepted_length(" self.items[k]", kept) == len(" self.items[")  # "k" is inside the word "key"
    assert accepted_length(" self.itemz", kept) == len(" self.")  # back to the end of "self."
    assert accepted_length(" sel", kept) == 0 and accepted_length("x", kept) == 0
    assert accepted_length(" self.items", kept) == len(" self.items")  # stops where kept's word stops
    assert accepted_length(" self.items[key] = value\n    return", kept) == len(kept)
    # Accepted means at least min_accept_words whole words were accepted.
    assert is_accepted(" self.itemz", kept, 1) == len(" self.") and is_accepted(" self.itemz", kept, 2) == 0
    assert is_accepted(" self.items[k]", kept, 2) == len(" self.items[")
    assert is_accepted("(", "(x)", 1) == 0  # punctuation alone is no word
    assert words_in(" self.items[") == 2


def test_decision_accepts_the_suggestion_that_saves_most_typing():
    kept = "return a + b"
    texts = ["return a", "ret", "return a + b  # sum", "pass", "  "]
    assert decide(texts, kept, 1) == [("rejected", 0), ("rejected", 0), ("accepted", len(kept)), ("rejected", 0), None]
    assert decide(texts, kept, 9) == [("rejected", 0)] * 4 + [None]  # none has 9 words: all shown ones rejected
    assert decide(["return a - b", "return a * b"], kept, 1) == [("accepted", len("return a ")), ("rejected", 0)]
    # A duplicate of the accepted text gets no event, so no text is both accepted and rejected.
    assert decide(["x", "return a + b", "return a + b"], kept, 1) == [("rejected", 0), ("accepted", 12), None]
    assert cursor_seed(11, 0) != cursor_seed(11, 1) != cursor_seed(12, 1) and cursor_seed(11, 3) == cursor_seed(11, 3)


def test_cursor_columns_are_inside_lines_never_after_a_bare_newline_or_a_blank():
    assert cursor_columns("def f(x):", 1) == [3, 5, 6, 7, 8]  # def| f|( x|) ...: after a word or punctuation
    assert cursor_columns("    return self.x", 4) == [4, 10]  # after the indentation, after "return"
    assert 0 not in cursor_columns("x = 1", 1)  # column 0 of an unindented line follows a bare newline
    line = "        if not isinstance(obj, (list, tuple)):"
    for j in cursor_columns(line, 1):
        assert j == 8 or not line[j - 1].isspace()
        assert not (line[j - 1].isalnum() and line[j].isalnum())  # never inside a word


def test_cursors_are_deterministic_realistic_and_disjoint_across_rounds():
    cfg = SimulateConfig(cursors_per_file=3, seed=5)
    text = stdlib_files(["textwrap.py"])["textwrap.py"]
    doc = {"id": "d1", "lang": "python", "path": "x.py", "content": text}
    a, b = cursors(doc, cfg), cursors(doc, cfg)
    assert a == b and len(a) == 3
    lines = text.split("\n")
    for c in a:
        line = lines[c.line_no]
        assert c.prefix.endswith(line[:c.col]) and c.kept == line[c.col:] and not c.prefix.endswith("\n")
        assert c.suffix.startswith("\n" + lines[c.line_no + 1])
        assert len(c.kept.strip()) >= cfg.min_kept_chars
    rounds = [{(c.line_no, c.col) for c in cursors(doc, cfg, r)} for r in range(4)]
    assert all(len(r) == 3 for r in rounds)
    assert all(not (rounds[i] & rounds[j]) for i in range(4) for j in range(i))  # fresh cursors each round
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
    params["rlhf"].setdefault("gate", {})["heldout_frac"] = 0.01  # (nearly) every val file is the simulator's
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
    shown = sum(summary["choice_events"].values())  # an empty suggestion is not shown: no event
    assert summary["choices"] == 1 and 6 <= shown <= 8
    assert 0 <= summary["accepted"] <= 8 and summary["bounties"]["derived"] == 3
    assert summary["bounties"]["added"] == 3
    acceptance = json.loads(first["simulated/acceptance.json"])
    cell = acceptance["by_version_language"][0]
    assert (cell["model"], cell["language"], cell["served"], cell["decided"]) == ("base", "python", 8, shown)
    assert cell["accepted"] == summary["accepted"] and 0 <= cell["ci95"][0] <= cell["ci95"][1] <= 1
    assert first["simulated/acceptance.png"].startswith(b"\x89PNG")

    from feedback import store
    from feedback.db import session_factory

    with session_factory(f"sqlite:///{tmp / 'fb.db'}")() as s:
        counts = store.counts(s)
    assert (counts["completions"], counts["feedback_events"], counts["bounties"]) == (8, shown, 3)
    with session_factory(f"sqlite:///{tmp / 'fb.db'}")() as s:  # every shown suggestion knows what was typed
        from sqlalchemy import select

        from feedback.models import Completion, FeedbackEvent
        kept = s.execute(select(Completion.kept_text, Completion.kept_source, FeedbackEvent.accepted_chars,
                                FeedbackEvent.kind).join(FeedbackEvent)).all()
    assert len(kept) == shown and all(k and src == "simulated" for k, src, _, _ in kept)
    assert all((n is None) == (kind.value != "accepted") for _, _, n, kind in kept)

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


SEVERAL = {"users": 2, "files": 4, "cursors_per_file": 4, "max_tokens": 8, "bounties": 0, "seed": 3, "choices": 8,
           "temperature": 1.0, "min_accept_words": 1}


@pytest.fixture(scope="module")
def fim_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model taught the FIM task on the very cursors the test below simulates (the plain tiny model
    never saw a FIM prompt, so none of its line suggestions is ever a whole word right)."""
    from tests.conftest import fim_tune

    tmp = tmp_path_factory.mktemp("sim_docs")
    params = load_params_file(write_sim_params(tmp, tiny_model_dir, SEVERAL))
    from pipeline.eval.fim import validation_docs

    cfg = params.feedback.simulate
    docs = validation_docs(params, part="feedback", gate_frac=params.rlhf.gate.heldout_frac)
    cases = [(c.prefix, c.suffix, c.kept) for d in pick_files(docs, cfg) for c in cursors(d, cfg)]
    return fim_tune(tiny_model_dir, tmp_path_factory.mktemp("fim_model"), cases, steps=100,
                    max_new_tokens=cfg.max_tokens, max_chars=cfg.max_context_chars)


def load_params_file(path):
    from pipeline.config import load_params

    return load_params(path)


def test_several_choices_make_preference_pairs_deterministically(tmp_path, fim_model_dir):
    """choices=8: per cursor one request, eight sampled suggestions, the closest passing one accepted and the
    rest rejected; the snapshot pairs them; a rerun leaves the same store and the same reports."""
    from collections import defaultdict

    from pipeline.config import load_params
    from rlhf.snapshot import build_snapshot, load_store

    path = write_sim_params(tmp_path, fim_model_dir, SEVERAL)
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
        # No event only for an empty suggestion (not shown) or a duplicate of the accepted one.
        assert all(r[5] is not None or r[4] in accepted or not r[4].strip() for r in v)
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
    # chosen: what the user kept at the cursor (the real continuation the simulated user reports), else the
    # accepted suggestion (rlhf.chosen); never a rejected one
    chosen = {r[4] for v in mixed for r in v if r[5] == "accepted"} | {d.kept for d in decisions if d.kept}
    rejected = {r[4] for v in by_request.values() for r in v if r[5] == "rejected"}
    assert {p["chosen"] for p in snap.pairs} <= chosen
    assert {p["rejected"] for p in snap.pairs} <= rejected

    # Seeded sampling: a rerun serves the same suggestions and records the same decisions.
    assert ownllm(["feedback", "simulate", "--params", str(path)]) == 0
    assert [r[:-1] for r in store_rows(db_url)] == [r[:-1] for r in rows]
    assert report_files(tmp_path / "reports" / "feedback") == reports


def test_typing_mode_lets_the_gateway_derive_what_was_kept(tmp_path, tiny_model_dir):
    """typing: the user never reports kept_text; the editor's next request (file path, prefix past the cursor)
    makes the gateway derive it, and it is exactly the rest of the line the user typed."""
    from sqlalchemy import select

    from feedback.db import session_factory
    from feedback.models import Completion, FeedbackEvent
    from pipeline.config import load_params
    from pipeline.eval.fim import validation_docs

    simulate = {"users": 2, "files": 3, "cursors_per_file": 2, "max_tokens": 8, "bounties": 0, "seed": 3,
                "choices": 1, "typing": True}
    path = write_sim_params(tmp_path, tiny_model_dir, simulate)
    assert ownllm(["feedback", "simulate", "--params", str(path)]) == 0
    summary = json.loads((tmp_path / "reports" / "feedback" / "simulate.json").read_text())
    assert summary["typing"] is True and summary["follow_up_requests"] == summary["cursors"] == 6
    params = load_params(path)
    cfg = params.feedback.simulate
    cases = [c for d in pick_files(validation_docs(params, columns=("id", "lang", "path", "content"),
                                                   part="feedback", gate_frac=params.rlhf.gate.heldout_frac),
                                 cfg) for c in cursors(d, cfg)]
    expected = {c.prefix: c.kept for c in cases}
    with session_factory(f"sqlite:///{tmp_path / 'fb.db'}")() as s:
        rows = s.execute(select(Completion.prompt, Completion.kept_text, Completion.kept_source, Completion.filepath,
                                FeedbackEvent.kind).outerjoin(FeedbackEvent)).all()
    cursor_rows = [r for r in rows if r.prompt in expected]
    assert len(cursor_rows) == 6 and len(rows) == 12  # each cursor's request and its follow-up
    for r in cursor_rows:
        assert (r.kept_text, r.kept_source) == (expected[r.prompt], "derived") and r.filepath
    assert all(r.kept_text is None for r in rows if r.prompt not in expected)  # follow-ups: nothing after them
