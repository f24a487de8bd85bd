"""The whole loop on the tiny model: store → refresh (snapshot, SFT, DPO, gate, register) → nothing to do."""

from __future__ import annotations

import json

import pytest

from rlhf.refresh import read_state, refresh
from rlhf_fixtures import (add_store_rows, e2e_params, make_store, sample_bounties, sample_decisions,
                           write_dedup_docs)


@pytest.mark.slow
def test_refresh_end_to_end_then_nothing_to_do(tmp_path, tiny_model_dir):
    # A margin of 100 characters per cursor and z=100: this test is about the machinery, not the tiny model.
    params = e2e_params(tmp_path, tiny_model_dir, gate={"margin": 100.0, "regression_z": 100.0})
    write_dedup_docs(tmp_path / "data/dedup")
    url = make_store(tmp_path, tiny_model_dir, sample_decisions(4), sample_bounties(2))

    first = refresh(params, url)
    assert first.status == "registered" and first.exit_code == 0 and first.version.startswith("ft-")
    reports = tmp_path / "reports"
    from rlhf import stages

    stages.loop(params)  # the `loop` stage: one round here (no rlhf.loop.rounds)
    loop = json.loads((reports / "loop.json").read_text())
    rnd = loop["rounds"][-1]
    assert loop["gate_passed"] and rnd["snapshot"] == {"sft": 2, "pairs": 8, "unpaired": 12}
    assert {"fim.infill_exact", "fim.next_line_exact", "heldout.acceptance", "heldout.utility_per_cursor",
            "humaneval.pass@1"} <= set(rnd["metrics"])
    u = rnd["paired"]["utility"]
    assert u["ci95"][0] <= u["diff"] <= u["ci95"][1] and 0 <= u["p_value"] <= 1 and u["n"] > 0
    lo, hi = rnd["heldout"]["tuned"]["acceptance_ci95"]
    assert 0 <= lo <= rnd["heldout"]["tuned"]["acceptance"] <= hi <= 1
    assert (reports / "loop.png").stat().st_size > 1000
    assert rnd["tuning"]["sft"]["method"] == "sft" and rnd["tuning"]["dpo"]["method"] == "dpo"

    second = refresh(params, url)
    assert second.status == "nothing_to_do" and second.snapshot_hash == first.snapshot_hash
    assert read_state(params.rlhf.state_file)["version"] == first.version

    # New feedback → work again; the parent is still 'base' (the new version is only in staff).
    from feedback.db import session_factory
    from feedback.store import get_or_create_user, get_version

    with session_factory(url).begin() as s:
        add_store_rows(s, get_or_create_user(s, "bob"), get_version(s, "base"),
                       [("def g(x):\n", "", "    return x + 1\n", True), ("def g(x):\n", "", "    pass\n", False)],
                       start=100)
    third = refresh(params, url)
    assert third.status in ("registered", "gate_failed") and third.snapshot_hash != first.snapshot_hash


@pytest.mark.slow
def test_failing_gate_exits_nonzero_and_registers_nothing(tmp_path, tiny_model_dir, capsys):
    """A real gate evaluation with an impossible bar: the tuned model must beat its parent by 100 characters
    per cursor (a negative margin is a superiority margin)."""
    from feedback.db import session_factory
    from feedback.store import list_versions
    from rlhf import stages

    params = e2e_params(tmp_path, tiny_model_dir, gate={"margin": -100.0, "skip_humaneval": True})
    write_dedup_docs(tmp_path / "data/dedup")
    url = make_store(tmp_path, tiny_model_dir, sample_decisions(2), sample_bounties(1))
    out = refresh(params, url)
    assert out.status == "gate_failed" and out.exit_code == 1
    assert "REGRESSED" in capsys.readouterr().out  # the deciding utility row
    with session_factory(url)() as s:
        assert [v.name for v in list_versions(s)] == ["base"]
    with pytest.raises(stages.GateFailed):
        stages.register(params, url)
    loop = stages.loop(params)["rounds"]
    assert [(r["gate_passed"], r["registered"], r["deployed"]) for r in loop] == [(False, None, "base")]
    assert json.loads((tmp_path / "reports/loop.json").read_text())["gate_passed"] is False
