"""The whole loop on the tiny model: store → refresh (snapshot, SFT, DPO, gate, register) → nothing to do."""

from __future__ import annotations

import json

import pytest

from rlhf.refresh import read_state, refresh
from rlhf_fixtures import (add_store_rows, e2e_params, make_store, sample_bounties, sample_decisions,
                           write_dedup_docs)


@pytest.mark.slow
def test_refresh_end_to_end_then_nothing_to_do(tmp_path, tiny_model_dir):
    # A tolerance of 1.0 on every gated metric: this test is about the machinery, not the tiny model's quality.
    params = e2e_params(tmp_path, tiny_model_dir, gate={"acceptance_tolerance": 1.0})
    params = params.model_copy(update={"eval": params.eval.model_copy(update={"tolerances": {
        k: 1.0 for k in params.eval.tolerances}})})
    write_dedup_docs(tmp_path / "data/dedup")
    url = make_store(tmp_path, tiny_model_dir, sample_decisions(4), sample_bounties(2))

    first = refresh(params, url)
    assert first.status == "registered" and first.exit_code == 0 and first.version.startswith("ft-")
    reports = tmp_path / "reports"
    loop = json.loads((reports / "loop.json").read_text())
    assert loop["gate_passed"] and loop["snapshot"] == {"sft": 2, "pairs": 8, "unpaired": 12}
    assert {"fim.infill_exact", "fim.next_line_exact", "heldout.acceptance", "humaneval.pass@1"} <= set(loop["metrics"])
    lo, hi = loop["heldout_acceptance"]["tuned"]["ci95"]
    assert 0 <= lo <= loop["metrics"]["heldout.acceptance"]["tuned"] <= hi <= 1
    assert (reports / "loop.png").stat().st_size > 1000
    assert loop["tuning"]["sft"]["method"] == "sft" and loop["tuning"]["dpo"]["method"] == "dpo"

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
    """A real gate evaluation with an impossible bar: the tuned model must beat its parent by 100%."""
    from feedback.db import session_factory
    from feedback.store import list_versions
    from rlhf import stages

    params = e2e_params(tmp_path, tiny_model_dir, gate={"acceptance_tolerance": 0.0, "skip_humaneval": True})
    params = params.model_copy(update={"eval": params.eval.model_copy(update={"tolerances": {
        "fim.infill_exact": -1.0}})})
    write_dedup_docs(tmp_path / "data/dedup")
    url = make_store(tmp_path, tiny_model_dir, sample_decisions(2), sample_bounties(1))
    out = refresh(params, url)
    assert out.status == "gate_failed" and out.exit_code == 1
    assert "REGRESSED" in capsys.readouterr().out
    with session_factory(url)() as s:
        assert [v.name for v in list_versions(s)] == ["base"]
    with pytest.raises(stages.GateFailed):
        stages.register(params, url)
    assert json.loads((tmp_path / "reports/loop.json").read_text())["gate_passed"] is False
