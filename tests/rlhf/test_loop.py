"""Several refresh rounds (rlhf/loop.py), as `dvc repro` runs them, on the tiny model: round 1 (simulate,
snapshot, SFT, DPO, gate, register), then round 2 from what round 1 deployed, then reports/loop.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import parse_params
from rlhf_fixtures import e2e_params, make_store, write_dedup_docs


def loop_params(tmp: Path, model_dir: Path, url: str, **gate):
    base = e2e_params(tmp, model_dir, gate={"skip_humaneval": True, **gate})
    data = base.model_dump(mode="json", exclude={"source_file"})
    data["serve"].update(model_dir=str(model_dir), db_url=url)
    data["feedback"]["reports_dir"] = str(tmp / "reports/feedback")
    data["feedback"]["simulate"].update(files=2, cursors_per_file=3, choices=2, users=2, bounties=2, max_tokens=8)
    data["rlhf"]["loop"] = {"dir": str(tmp / "loop"), "rounds": {"round-2": str(tmp / "reports/rlhf_register.json")}}
    return parse_params(data, "loop-params")


def round_one(params, url: str) -> dict:
    """What the classic stages do: simulate (round 0) → snapshot → sft → preference → gate → register."""
    from feedback.simulate import STAGE, simulate
    from pipeline.tracking import stage_run
    from rlhf.refresh import run_direct

    with stage_run(STAGE, params) as run:
        run.summary(simulate(params, url, 0))
    return run_direct(params, url)


def simulated_cursors(url: str) -> dict[str, set[tuple[str, str]]]:
    """(prefix, suffix) of every suggestion request of the simulated users, by the round tag they carry."""
    from sqlalchemy import select

    from feedback.db import session_factory
    from feedback.models import Completion

    out: dict[str, set] = {}
    with session_factory(url)() as s:
        for who, prompt, suffix in s.execute(select(Completion.end_user, Completion.prompt, Completion.suffix)):
            out.setdefault(who.rpartition("/ide")[2].lstrip("/") or "round-0", set()).add((prompt, suffix))
    return out


@pytest.mark.slow
def test_two_rounds_chain_on_fresh_cursors_and_the_loop_reports_both(tmp_path, tiny_model_dir, capsys):
    from rlhf import stages
    from rlhf.loop import round_params

    write_dedup_docs(tmp_path / "data/dedup")
    url = make_store(tmp_path, tiny_model_dir, [])  # 'base' (the tiny model) serves everyone
    # margin 100 characters per cursor: this test is about the chaining, not the tiny model's quality
    params = loop_params(tmp_path, tiny_model_dir, url, margin=100.0, regression_z=100.0)

    first = round_one(params, url)
    assert first["registered"], first
    v1 = first["version"]
    before = simulated_cursors(url)

    capsys.readouterr()
    second = stages.loop_round(params, url, "round-2")
    assert "evaluation in " in (log := capsys.readouterr().err) and "reused" in log
    r2 = round_params(params, 2)
    out = tmp_path / "loop/round-2"
    # Round 2 tuned from what round 1 deployed (its registered version, round 1's tuned weights)...
    parent = json.loads((out / "snapshot/parent.json").read_text())
    filt = json.loads((tmp_path / "reports/eval/rlhf-deployed/filter.json").read_text()) \
        if params.rlhf.filter.enabled else None
    assert parent == {"version": v1, "model_dir": params.rlhf.tuned_out, **({"filter": filt} if filt else {})}
    assert r2.rlhf.tuned_out == str(out / "tuned") and (out / "tuned/config.json").is_file()
    assert second["registered"] and second["lineage"]["parent"] == v1 and second["version"] != v1
    gate2 = json.loads((out / "rlhf_gate.json").read_text())
    assert gate2["parent"]["version"] == v1
    # Its gate reused round 1's evaluation of that model (as round 1's tuned model), and evaluating it afresh
    # writes the same files: the reuse's premise.
    from rlhf.gate import evaluate, reuse_evaluation

    reused, round1_tuned = out / "eval/rlhf-parent", tmp_path / "reports/eval/rlhf-tuned"
    fresh = evaluate(r2, "fresh-parent", params.rlhf.tuned_out)
    for name in ("heldout.json", "heldout_results.jsonl", "fim.json", "fim_results.jsonl", "idioms.json"):
        assert (reused / name).read_bytes() == (round1_tuned / name).read_bytes() == (fresh / name).read_bytes()
    assert reuse_evaluation(r2, parent, {"dir": str(round1_tuned), "weights_sha256": "0" * 64}) is None

    # ... on fresh cursors: round 2's users asked at cursors round 1 never did, and round 1's traffic stayed.
    after = simulated_cursors(url)
    assert before.keys() == {"round-0"} and after.keys() == {"round-0", "round-1"}
    assert after["round-0"] == before["round-0"] and after["round-1"]
    assert not after["round-1"] & after["round-0"]
    sim2 = json.loads((out / "feedback/simulate.json").read_text())
    assert sim2["round"] == 1 and sim2["cursors"] == json.loads(
        (tmp_path / "reports/feedback/simulate.json").read_text())["cursors"]
    # Feedback accumulates: round 2's snapshot holds round 1's examples and more.
    snap1 = json.loads((tmp_path / "data/feedback/manifest.json").read_text())["counts"]
    snap2 = json.loads((out / "snapshot/manifest.json").read_text())["counts"]
    assert snap2["unpaired"] > snap1["unpaired"] and snap2["sft"] >= snap1["sft"]

    report = stages.loop(params)
    on_disk = json.loads((tmp_path / "reports/loop.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    r1, r2e = on_disk["rounds"]
    assert (r1["round"], r2e["round"]) == (1, 2)
    assert r1["parent"] == "base" and r1["registered"] == v1 and r1["deployed"] == v1
    assert r2e["parent"] == v1 and r2e["registered"] == second["version"]
    assert (r1["traffic"]["simulate_round"], r2e["traffic"]["simulate_round"]) == (0, 1)
    for r in (r1, r2e):
        u = r["paired"]["utility"]
        assert u["ci95"][0] <= u["diff"] <= u["ci95"][1] and 0 <= u["p_value"] <= 1
        assert "heldout.utility_per_cursor" in r["metrics"] and r["snapshot"]["unpaired"] > 0
    assert (tmp_path / "reports/loop.png").stat().st_size > 1000
    # Against what users had and against the base, on the same cursors: before round 1 the base (no filter), so
    # round 1's comparisons with "before" and with the base are one, and its model-vs-base is its own gate's test;
    # round 2's "before" is what round 1 deployed (its tuned model + filter replay), not the parent model alone.
    from rlhf.loop import deployed_replays

    assert r1["versus"]["model_vs_base"]["tests"] == {k: r1["paired"][k] for k in ("utility", "accepted_chars",
                                                                                    "accepted", "shown")}
    assert r1["versus"]["deployed_vs_before"] == r1["versus"]["deployed_vs_base"]
    assert deployed_replays(params, 0) == (tmp_path / "reports/eval/rlhf-parent",) * 2
    filtered = params.rlhf.filter.enabled
    assert deployed_replays(params, 1) == (tmp_path / "reports/eval/rlhf-tuned",
                                           tmp_path / f"reports/eval/rlhf-{'deployed' if filtered else 'tuned'}")
    for r in (r1, r2e):
        assert {k: v["cursors"] for k, v in r["versus"].items()} == dict.fromkeys(
            ("deployed_vs_before", "model_vs_base", "deployed_vs_base"), r["paired"]["utility"]["n"])

    # A rerun of round 2 (what `dvc repro` does after a change) replaces its own traffic, nothing else, and its
    # users are served by the version that served everyone after round 1 again, whatever a later round promoted.
    from feedback.db import session_factory
    from feedback.store import current_all, promote

    with session_factory(url).begin() as s:
        promote(s, second["version"], "all")
    stages.loop_round(params, url, "round-2")
    with session_factory(url)() as s:
        assert current_all(s).name == "base"
    assert list(json.loads((out / "feedback/simulate.json").read_text())["by_model"]) == ["base"]
    assert simulated_cursors(url) == after
    assert json.loads((out / "snapshot/manifest.json").read_text())["content_hash"] == \
        json.loads((tmp_path / "reports/loop.json").read_text())["rounds"][1]["snapshot_hash"]


def test_rounds_must_be_named_and_chained(tmp_path, tiny_model_dir):
    """DVC silently drops integer foreach keys, and cannot compute round N-1: both are checked."""
    from pipeline.config import ParamsError
    from pipeline.cli import UserError
    from rlhf import stages
    from rlhf.loop import later_rounds

    url = f"sqlite:///{tmp_path / 'fb.db'}"
    params = loop_params(tmp_path, tiny_model_dir, url)
    data = params.model_dump(mode="json", exclude={"source_file"})
    data["rlhf"]["loop"]["rounds"] = {2: "reports/rlhf_register.json"}
    with pytest.raises((ParamsError, ValueError), match="round-2"):
        parse_params(data, "bad")
    data["rlhf"]["loop"]["rounds"] = {"round-2": str(tmp_path / "reports/rlhf_register.json"),
                                      "round-3": str(tmp_path / "loop/round-1")}
    with pytest.raises(ValueError, match="round-3.*must be .*round-2"):
        later_rounds(parse_params(data, "bad"))
    with pytest.raises(UserError, match="round 1 has not run"):  # round 2 before round 1
        stages.loop_round(params, url, "round-2")
    with pytest.raises(UserError, match="not one of rlhf.loop.rounds"):
        stages.loop_round(params, url, "round-4")
