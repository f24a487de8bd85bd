"""Snapshot: real SQLite store → TRL-format JSONL, deterministic, PII-redacted, deduplicated."""

from __future__ import annotations

import json
import random

import pyarrow.parquet as pq

from rlhf.snapshot import (Decision, build_snapshot, read_manifest, render_prompt, take_snapshot,
                           write_snapshot)
from rlhf_fixtures import code_chunks, make_store, rlhf_params, sample_bounties, sample_decisions


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_snapshot_formats_and_determinism(tmp_path, tiny_model_dir):
    params = rlhf_params(tmp_path, tiny_model_dir, max_pairs_per_context=4)
    decisions = sample_decisions(6)
    url = make_store(tmp_path, tiny_model_dir, decisions, sample_bounties(3))
    # The same database content inserted in another order must give the same bytes.
    shuffled = decisions[:]
    random.Random(0).shuffle(shuffled)
    url2 = make_store(tmp_path, tiny_model_dir, shuffled, list(reversed(sample_bounties(3))), db_name="other.db")

    snap, parent = take_snapshot(params, url)
    m1 = write_snapshot(snap, tmp_path / "a", parent)
    m2 = write_snapshot(take_snapshot(params, url2)[0], tmp_path / "b", parent)
    for name in ("sft.jsonl", "pairs.jsonl", "unpaired.jsonl", "manifest.json", "rejected.parquet"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert m1["content_hash"] == m2["content_hash"]
    assert parent == {"version": "base", "model_dir": str(tiny_model_dir)}

    sft, pairs, unpaired = (_rows(tmp_path / "a" / f) for f in ("sft.jsonl", "pairs.jsonl", "unpaired.jsonl"))
    assert len(sft) == 3 and {"id", "prompt", "completion"} <= sft[0].keys()
    assert sft[0]["prompt"].startswith("# task")
    assert len(pairs) == 12  # 6 contexts x 1 accepted x 2 rejected
    truths = {t for _, t in code_chunks(6)}
    assert all(p["chosen"] in truths and p["rejected"] in ("    pass\n", "    return None\n") for p in pairs)
    assert len(unpaired) == 18 and sum(r["label"] for r in unpaired) == 6
    assert [r["id"] for r in pairs] == sorted(r["id"] for r in pairs)
    assert read_manifest(tmp_path / "a")["counts"] == {"sft": 3, "pairs": 12, "unpaired": 18}


def test_pii_redacted_conflicts_dropped_and_near_duplicates_removed(tmp_path, tiny_model_dir):
    params = rlhf_params(tmp_path, tiny_model_dir, max_pairs_per_context=1)
    (p1, t1), (p2, t2) = code_chunks(2)
    decisions = [
        Decision("python", p1, "", t1 + "# mail bob.smith@example.com\n", True),
        Decision("python", p1, "", "    pass\n", False),
        Decision("python", p1, "", "    return 1\n", False),
        Decision("python", p1 + " ", "", t1, True),  # near-identical context (one char more)
        Decision("python", p1 + " ", "", "    pass\n", False),
        Decision("python", p2, "def f():\n", t2, True),  # FIM context; t2 both accepted and rejected
        Decision("python", p2, "def f():\n", t2, False),
    ]
    snap = build_snapshot(decisions, [], params)
    text = json.dumps(snap.pairs + snap.unpaired)
    assert "bob.smith@example.com" not in text and "<EMAIL>" in text
    assert snap.stats["pii_redactions"] == {"email": 1}
    assert snap.stats["conflicting_label"] == 1
    assert len(snap.pairs) == 1  # capped at one per context; the near-duplicate context is gone
    assert snap.stats["rejected"] == {"near_duplicate": 1}
    fim = [r for r in snap.unpaired if r["prompt"].startswith("<fim_prefix>")]
    assert fim == []  # the FIM context's only completion was conflicting
    assert render_prompt("abc", "xyz", 30) == "<fim_prefix>abc<fim_suffix>xyz<fim_middle>"
    write_snapshot(snap, tmp_path / "s", {"version": None, "model_dir": "m"})
    rej = pq.read_table(tmp_path / "s" / "rejected.parquet")
    assert rej.column("reason").to_pylist() == ["near_duplicate"]


def test_humaneval_solutions_are_decontaminated(tmp_path, tiny_model_dir):
    from pipeline.data.decontam import humaneval_file, read_problems

    from rlhf.snapshot import BountyText, benchmark_decontaminator

    params = rlhf_params(tmp_path, tiny_model_dir)
    he = read_problems(humaneval_file())[2]
    (p1, t1), = code_chunks(1)
    bounties = [BountyText("copy", he["prompt"], "python", he["solution"]),
                BountyText("fine", "continue", "python", t1)]
    decisions = [Decision("python", he["prompt"], "", he["solution"], True),
                 Decision("python", he["prompt"], "", "    pass\n", False)]
    snap = build_snapshot(decisions, bounties, params, benchmark_decontaminator(params))
    assert [r["completion"] for r in snap.sft] == [t1]
    assert snap.pairs == [] and snap.unpaired == []
    assert snap.stats["rejected"] == {"decontamination": 2}
    assert set(snap.rejected.column("detail").to_pylist()) == {he["task_id"]}


def test_registry_paths_inside_the_repo_are_written_relative(tmp_path, monkeypatch):
    # parent.json is a DVC output: an absolute path would make every clone's snapshot hash differ.
    from rlhf.snapshot import portable_path

    (tmp_path / "models/base").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert portable_path(str(tmp_path / "models/base")) == "models/base"
    assert portable_path("/opt/elsewhere/model") == "/opt/elsewhere/model"


def test_kept_code_becomes_sft_and_the_chosen_side_of_pairs(tmp_path, tiny_model_dir):
    """What the user kept at a cursor: an SFT example (FIM prompt -> kept text) and the chosen side against
    every rejected suggestion there, even where no suggestion was accepted; each learner's data by params."""
    prefix, suffix = "def area(r):\n    return", "\nprint(area(2))\n"
    kept = " 3.14159 * r * r"
    decisions = [Decision("python", prefix, suffix, " r", False, kept),
                 Decision("python", prefix, suffix, " None", False, kept),
                 Decision("python", prefix, suffix, " 3.14", True, kept)]
    params = rlhf_params(tmp_path, tiny_model_dir, decontam=False)
    snap = build_snapshot(decisions, [], params)
    prompt = render_prompt(prefix, suffix, params.rlhf.max_prompt_chars)
    assert [(r["prompt"], r["completion"], r["source"]) for r in snap.sft] == [(prompt, kept, "kept")]
    assert sorted((p["chosen"], p["rejected"]) for p in snap.pairs) == [(kept, " None"), (kept, " r")]
    assert snap.stats["sft_kept"] == 1 and snap.stats["contexts_with_kept"] == 1

    both = build_snapshot(decisions, [], rlhf_params(tmp_path, tiny_model_dir, decontam=False, chosen="both"))
    assert sorted(p["chosen"] for p in both.pairs) == sorted([kept, kept, " 3.14", " 3.14"])
    off = build_snapshot(decisions, [], rlhf_params(tmp_path, tiny_model_dir, decontam=False, sft_kept=False,
                                                    chosen="accepted"))
    assert off.sft == [] and {p["chosen"] for p in off.pairs} == {" 3.14"}
    # No kept text (a client that reports none): the accepted suggestion stays the chosen side.
    plain = [Decision(d.language, d.prefix, d.suffix, d.completion, d.accepted) for d in decisions]
    assert {p["chosen"] for p in build_snapshot(plain, [], params).pairs} == {" 3.14"}


def test_only_served_completions_reach_the_snapshot(tmp_path, tiny_model_dir):
    """A decision on a row that was not served whole (pending, disconnected, failed) is not training data."""
    from sqlalchemy import update

    from feedback.db import session_factory
    from feedback.models import Completion
    from rlhf.snapshot import load_store

    decisions = sample_decisions(4)
    url = make_store(tmp_path, tiny_model_dir, decisions)
    with session_factory(url)() as s:
        assert len(load_store(s)[0]) == len(decisions)
    with session_factory(url).begin() as s:
        for rid, status in (("req-0", "pending"), ("req-1", "disconnected"), ("req-2", "failed")):
            s.execute(update(Completion).where(Completion.request_id == rid).values(status=status))
    with session_factory(url)() as s:
        kept = load_store(s)[0]
    assert len(kept) == len(decisions) - 3
    assert {d.completion for d in kept} == {c for _, _, c, _ in decisions[3:]}


def test_dvc_repro_pins_round_one_to_the_base_while_refresh_tunes_from_production(tmp_path, tiny_model_dir,
                                                                                 monkeypatch):
    """The live-store trap: after a run registered a version at `all`, a `dvc repro` that reruns the snapshot
    (`ownllm rlhf snapshot`, no flag) must still tune from rlhf.base_model, so its outputs depend only on what DVC
    tracks; `ownllm rlhf refresh` (the production path) tunes from `all` (test_refresh.py: the variable reaches the
    stages of its `dvc exp run`)."""
    import shutil

    import yaml

    from feedback.db import session_factory
    from feedback.store import promote, register_model_version
    from pipeline.cli import main
    from rlhf.snapshot import PARENT_FROM_ENV

    params = rlhf_params(tmp_path, tiny_model_dir)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    url = make_store(tmp_path, tiny_model_dir, sample_decisions(2))
    live = tmp_path / "models/registry/ft-live"
    shutil.copytree(tiny_model_dir, live)
    with session_factory(url).begin() as s:  # what an earlier run's register left in the store
        register_model_version(s, "ft-live", str(live), state="staff")
        promote(s, "ft-live", "all")
    parent_json = tmp_path / "data/feedback/parent.json"

    monkeypatch.delenv(PARENT_FROM_ENV, raising=False)
    assert main(["rlhf", "snapshot", "--params", str(params_file), "--db-url", url]) == 0  # the DVC stage's command
    assert json.loads(parent_json.read_text()) == {"version": "base", "model_dir": str(tiny_model_dir)}

    monkeypatch.setenv(PARENT_FROM_ENV, "production")  # what `ownllm rlhf refresh` sets for `dvc exp run`
    assert main(["rlhf", "snapshot", "--params", str(params_file), "--db-url", url]) == 0
    assert json.loads(parent_json.read_text()) == {"version": "ft-live", "model_dir": str(live)}
    assert main(["rlhf", "snapshot", "--params", str(params_file), "--db-url", url, "--parent", "base"]) == 0
    assert json.loads(parent_json.read_text())["version"] == "base"
    monkeypatch.setenv(PARENT_FROM_ENV, "latest")
    assert main(["rlhf", "snapshot", "--params", str(params_file), "--db-url", url]) == 2


def test_kept_text_where_nothing_was_shown_is_learned_but_never_a_preference(tmp_path, tiny_model_dir):
    """With the filter on most suggestions are hidden, yet the user types the code anyway: that kept text is an
    SFT row (marked ``shown: false``, with its provenance); the hidden suggestion is neither chosen nor rejected."""
    from rlhf.snapshot import UnseenKept

    params = rlhf_params(tmp_path, tiny_model_dir, decontam=False)
    seen = ("def area(r):\n    return", "\nprint(area(2))\n")
    hidden = ("def norm(v):\n    return", "\nprint(norm(2))\n")
    decisions = [Decision("python", *seen, " r", False, " 3.14159 * r * r", "derived")]
    unseen = [UnseenKept("python", *hidden, " math.sqrt(sum(x * x for x in v))", "derived"),
              UnseenKept("python", *seen, " 3.14159 * r * r", "simulated"),  # the hidden 2nd choice at a seen cursor
              UnseenKept("python", "x = 1\ny =", "", "   ", "typed")]  # blank: nothing to learn
    snap = build_snapshot(decisions, [], params, unseen_kept=unseen)
    rows = {r["completion"]: r for r in snap.sft}
    assert set(rows) == {" 3.14159 * r * r", " math.sqrt(sum(x * x for x in v))"}
    assert rows[" math.sqrt(sum(x * x for x in v))"]["prompt"] == render_prompt(*hidden, params.rlhf.max_prompt_chars)
    assert (rows[" math.sqrt(sum(x * x for x in v))"]["shown"], rows[" math.sqrt(sum(x * x for x in v))"]["kept_sources"]) \
        == (False, ["derived"])
    assert (rows[" 3.14159 * r * r"]["shown"], rows[" 3.14159 * r * r"]["kept_sources"]) == (True, ["derived", "simulated"])
    # Preferences stay on what the user saw: one pair at the seen cursor, none at the hidden one.
    assert [(p["chosen"], p["rejected"]) for p in snap.pairs] == [(" 3.14159 * r * r", " r")]
    assert [(u["completion"], u["label"]) for u in snap.unpaired] == [(" r", False)]
    assert snap.stats["sft_kept"] == 2 and snap.stats["sft_kept_unshown"] == 1 and snap.stats["unseen_kept_in"] == 3
    # Without the unseen rows (the snapshot before this change) the hidden cursor teaches nothing.
    assert len(build_snapshot(decisions, [], params).sft) == 1


def test_the_store_gives_kept_text_of_filtered_and_empty_suggestions_under_the_privacy_rules(tmp_path, tiny_model_dir):
    """Rows the filter hid and empty suggestions (no event) reach the snapshot through what the user kept there;
    a row still pending does not, a purged row does not, a user who stores no code does not, and PII in the
    kept text is redacted. Acceptance analytics still count served rows only."""
    from datetime import timedelta

    from sqlalchemy import update

    from feedback.analytics import acceptance
    from feedback.db import session_factory
    from feedback.models import Completion, utcnow
    from feedback.store import get_or_create_user, get_version, purge_texts, sha256

    params = rlhf_params(tmp_path, tiny_model_dir, decontam=False)
    url = make_store(tmp_path, tiny_model_dir, sample_decisions(1))
    chunks = code_chunks(6)[1:]
    with session_factory(url).begin() as s:
        mv = get_version(s, "base")
        alice, bob = get_or_create_user(s, "alice"), get_or_create_user(s, "bob")
        bob.store_code = False
        s.flush()

        def row(rid, user, prefix, completion, status, kept, source="derived", keep_code=True):
            s.add(Completion(request_id=rid, choice_index=0, user_id=user.id, model_version_id=mv.id, language="python",
                             prompt=prefix if keep_code else None, suffix=None,
                             completion=completion if keep_code else None, prompt_hash=sha256(prefix),
                             finish_reason="stop", prompt_tokens=1, completion_tokens=1, latency_ms=1.0, status=status,
                             kept_text=kept, kept_source=source))
        row("hidden", alice, chunks[0][0], "    pass", "filtered", chunks[0][1])
        row("empty", alice, chunks[1][0], "", "served", chunks[1][1], "simulated")
        row("pii", alice, chunks[2][0], "    pass", "filtered", "    mail = 'ann@example.com'\n")
        row("pending", alice, chunks[3][0], "", "pending", chunks[3][1])
        row("no-code", bob, chunks[4][0], "    pass", "filtered", None, None, keep_code=False)
        row("old", alice, "def old():\n    return", "    pass", "filtered", " 42")
        s.flush()
        s.execute(update(Completion).where(Completion.request_id == "old")
                  .values(created_at=utcnow() - timedelta(days=40)))
        assert purge_texts(s, 30) == 1
    before = {c["model"]: (c["served"], c["filtered"], c["decided"]) for c in _acceptance(url, acceptance)}

    snap, _ = take_snapshot(params, url)
    kept = {r["completion"]: r for r in snap.sft if r["source"] == "kept"}
    assert set(kept) == {chunks[0][1], chunks[1][1], "    mail = '<EMAIL>'\n"}
    assert all("ann@example.com" not in r["prompt"] + r["completion"] for r in snap.sft)
    assert kept[chunks[0][1]]["shown"] is False and kept[chunks[0][1]]["kept_sources"] == ["derived"]
    assert kept[chunks[1][1]]["kept_sources"] == ["simulated"]
    assert snap.stats["sft_kept_unshown"] == 3 and snap.stats["unseen_kept_in"] == 3
    assert all(p["rejected"] != "    pass" for p in snap.pairs) and len(snap.pairs) == 2  # sample_decisions(1) only
    off = build_snapshot([], [], rlhf_params(tmp_path, tiny_model_dir, decontam=False, sft_kept=False))
    assert off.sft == []
    assert {c["model"]: (c["served"], c["filtered"], c["decided"]) for c in _acceptance(url, acceptance)} == before
    assert before["base"][1] == 4  # hidden, pii, no-code, old: filtered, not served


def _acceptance(url, acceptance):
    from feedback.db import session_factory

    with session_factory(url)() as s:
        return acceptance(s, by_language=False)
