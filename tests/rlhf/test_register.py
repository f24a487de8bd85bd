"""Register only on a passed gate; lineage of a registered version reproduces its weights."""

from __future__ import annotations

import pytest

from pipeline.tracking import write_json
from rlhf.gate import GateResult, gate_path
from rlhf.lineage import check, describe, render
from rlhf.register import register_tuned
from rlhf.snapshot import take_snapshot, write_snapshot
from rlhf.tune import run_preference, run_sft, weights_hash
from rlhf_fixtures import make_store, params_file, rlhf_params, sample_bounties, sample_decisions


def _versions(url):
    from feedback.db import session_factory
    from feedback.store import list_versions

    with session_factory(url)() as s:
        return [v.name for v in list_versions(s)]


def _fake_gate(params, passed: bool, tuned_dir, significant: bool = False):
    rows = [{"metric": "heldout.acceptance", "parent": 0.5, "tuned": 0.5 if passed else 0.2,
             "delta": 0.0 if passed else -0.3, "tolerance": 0.05, "gated": True, "ok": passed}]
    write_json(gate_path(params), GateResult(passed, rows, {"version": "base", "model_dir": "x"},
                                             {"model_dir": str(tuned_dir), "weights_sha256": weights_hash(tuned_dir)},
                                             significant=significant,
                                             promote_to=("all" if significant else "staff") if passed else None).to_json())


def test_a_significant_gain_is_rolled_out_to_everyone(tmp_path, tiny_model_dir):
    """The gate's rule: significant → promote_to (all), so the next refresh tunes from it; else staff only."""
    import shutil

    from feedback.db import session_factory
    from feedback.store import current_all, get_version
    from rlhf.snapshot import production_parent

    tuned = tmp_path / "tuned"
    shutil.copytree(tiny_model_dir, tuned)
    params = rlhf_params(tmp_path, tiny_model_dir, tuned_out=str(tuned))
    url = make_store(tmp_path, tiny_model_dir, sample_decisions(1))
    _fake_gate(params, True, tuned, significant=False)
    res = register_tuned(params, url)
    with session_factory(url)() as s:
        assert get_version(s, res.version).rollout_state.value == "staff" and current_all(s).name == "base"
    assert res.to_json()["lineage"]["rollout"] == "staff"
    with session_factory(url).begin() as s:  # the next tuned model: different weights, a significant gain
        from feedback.store import retire
        retire(s, res.version)
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tuned)
    with torch.no_grad():
        m.lm_head.weight.mul_(1.01)
    m.save_pretrained(tuned)
    _fake_gate(params, True, tuned, significant=True)
    res2 = register_tuned(params, url)
    assert res2.version != res.version and res2.reason == "gate passed (significant)"
    with session_factory(url)() as s:
        assert current_all(s).name == res2.version
        assert production_parent(s, "models/base")["version"] == res2.version
        path = get_version(s, res2.version).path
    # The registered copy carries the gateway engine's CTranslate2 conversion, as `ownllm export` writes it for
    # the base model (without it the gateway serves the version with transformers, ~10x slower), and the
    # gateway serves the version with that engine.
    from feedback.app import BackendPool
    from feedback.config import ServeConfig
    from feedback.engine import CT2Backend, has_ct2

    assert has_ct2(path)
    with session_factory(url)() as s:
        backend = BackendPool(ServeConfig(engine="ctranslate2")).get(get_version(s, res2.version))
    assert isinstance(backend, CT2Backend)


def test_failing_gate_registers_nothing(tmp_path, tiny_model_dir, capsys):
    params = rlhf_params(tmp_path, tiny_model_dir, tuned_out=str(tiny_model_dir))
    url = make_store(tmp_path, tiny_model_dir, sample_decisions(2))
    _fake_gate(params, False, tiny_model_dir)
    res = register_tuned(params, url)
    assert not res.registered and res.reason == "gate failed"
    assert _versions(url) == ["base"]
    assert not (tmp_path / "models/registry").exists()

    # The command: exit 1 with the comparison table; `--on-fail record` (the DVC stage) exits 0.
    from pipeline.cli import main

    pfile = params_file(params, tmp_path / "params.yaml")
    assert main(["rlhf", "register", "--params", str(pfile), "--db-url", url]) == 1
    out = capsys.readouterr().out
    assert "heldout.acceptance" in out and "REGRESSED" in out and "gate: FAILED" in out
    assert main(["rlhf", "register", "--params", str(pfile), "--db-url", url, "--on-fail", "record"]) == 0
    assert _versions(url) == ["base"]
    assert main(["lineage", "nope", "--params", str(pfile), "--db-url", url]) == 2


@pytest.mark.slow
def test_registered_version_lineage_reproduces_weights(tmp_path, tiny_model_dir):
    params = rlhf_params(tmp_path, tiny_model_dir)
    url = make_store(tmp_path, tiny_model_dir, sample_decisions(4), sample_bounties(2))
    snap, parent = take_snapshot(params, url)
    write_snapshot(snap, params.rlhf.snapshot_dir, parent)
    run_sft(params)
    run_preference(params)
    _fake_gate(params, True, tmp_path / "models/tuned")
    res = register_tuned(params, url)
    assert res.registered and _versions(url) == ["base", res.version]
    info = describe(url, res.version)
    assert info["parents"] == ["base"] and info["snapshot_hash"] == snap.content_hash
    assert info["rollout"] == "staff" and "dvc repro --force --single-item sft preference" in render(info)
    # Registering the same weights again is a no-op, not a second version.
    assert register_tuned(params, url).version == res.version and len(_versions(url)) == 2

    # Reproduce from the lineage: the same snapshot and params, a fresh checkout → identical weights.
    again = rlhf_params(tmp_path / "repro", tiny_model_dir, snapshot_dir=params.rlhf.snapshot_dir)
    run_sft(again)
    run_preference(again)
    ok, msg = check(info, again.rlhf.tuned_out)
    assert ok, msg
    from pipeline.cli import main

    pfile = params_file(params, tmp_path / "params.yaml")
    assert main(["lineage", res.version, "--params", str(pfile), "--db-url", url, "--check", again.rlhf.tuned_out]) == 0
    ok, _ = check(info, tiny_model_dir)
    assert not ok


def test_the_version_carries_the_gates_suggestion_filter_and_refuses_one_for_other_weights(tmp_path, tiny_model_dir):
    import json
    import shutil

    from feedback.db import session_factory
    from feedback.store import get_version
    from feedback.suggestion_filter import REGISTRY_KEY, SuggestionFilter, of_version
    from rlhf.register import deployed_filter_path

    tuned = tmp_path / "tuned"
    shutil.copytree(tiny_model_dir, tuned)
    params = rlhf_params(tmp_path, tiny_model_dir, tuned_out=str(tuned))
    params = params.model_copy(update={"eval": params.eval.model_copy(update={"out": str(tmp_path / "reports/eval")}),
                                       "rlhf": params.rlhf.model_copy(update={
                                           "filter": params.rlhf.filter.model_copy(update={"enabled": True})})})
    url = make_store(tmp_path, tiny_model_dir, sample_decisions(1))
    _fake_gate(params, True, tuned)
    path = deployed_filter_path(params)
    path.parent.mkdir(parents=True)
    filt = SuggestionFilter([0.5] + [0.0] * 7, 1.0, 0.4, "0" * 64, 10, -1.0, 0.5)
    path.write_text(json.dumps(filt.to_json()))
    res = register_tuned(params, url)  # fitted for other weights: refused, nothing registered
    assert not res.registered and "suggestion filter was fitted for weights 000000000000" in res.reason
    assert _versions(url) == ["base"]

    filt.model_sha256 = weights_hash(tuned)
    path.write_text(json.dumps(filt.to_json()))
    res = register_tuned(params, url)
    assert res.registered and res.lineage["suggestion_filter"] == str(path)
    with session_factory(url)() as s:
        v = get_version(s, res.version)
        assert v.eval_results[REGISTRY_KEY]["sha256"] == filt.sha256()
        assert of_version(v) == filt  # loads back, checked against the registered copy's weights
