"""The gate can fail: paired statistics, and a real replay that tells a damaged model from a good one."""

from __future__ import annotations

import json
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import parse_params
from pipeline.eval.paired import clustered_mean_difference, mcnemar_exact, sampling_tolerance
from rlhf_fixtures import rlhf_params

STDLIB = Path(sysconfig.get_paths()["stdlib"])
# Short real files the "good" model below learns by heart: its suggestions on them are mostly right.
GATE_FILES = ["colorsys.py", "bisect.py", "keyword.py", "fnmatch.py", "glob.py", "reprlib.py", "queue.py", "heapq.py"]


# ------------------------------------------------------------------------------------------ statistics
def test_mcnemar_counts_discordant_pairs_only():
    parent = [True, True, False, False, True, False]
    tuned = [True, False, True, True, True, True]
    m = mcnemar_exact(parent, tuned)
    assert (m["both"], m["only_parent"], m["only_tuned"], m["neither"]) == (2, 1, 3, 0)
    assert 0.5 < m["p_value"] <= 1.0  # 1 vs 3 discordant: no evidence
    assert mcnemar_exact([True] * 5, [True] * 5)["p_value"] == 1.0
    many = mcnemar_exact([False] * 40, [True] * 30 + [False] * 10)
    assert many["only_tuned"] == 30 and many["p_value"] < 1e-6
    with pytest.raises(ValueError, match="length"):
        mcnemar_exact([True], [True, False])


def test_clustered_difference_finds_a_real_shift_and_not_a_null_one():
    rng = np.random.default_rng(0)
    files = [f"f{i // 20}" for i in range(600)]  # 30 files of 20 cursors
    parent = rng.integers(0, 12, 600).astype(float)
    shifted = parent + rng.normal(1.0, 3.0, 600)
    up = clustered_mean_difference("u", parent, shifted, files, seed=1, n_resamples=999)
    assert up.ci95[0] > 0 and up.p_value < 0.01 and up.clusters == 30 and up.n == 600
    assert up.ci95[0] < up.diff < up.ci95[1]
    noise = parent + rng.normal(0.0, 3.0, 600)
    null = clustered_mean_difference("u", parent, noise, files, seed=1, n_resamples=999)
    assert null.ci95[0] < 0 < null.ci95[1] and null.p_value > 0.05
    same = clustered_mean_difference("u", parent, parent, files, seed=1)
    assert same.diff == 0 and same.ci95 == (0.0, 0.0) and same.p_value == 1.0
    # Deterministic given the seed.
    assert clustered_mean_difference("u", parent, shifted, files, seed=1, n_resamples=999) == up


def test_cluster_bootstrap_is_wider_than_an_iid_one_when_files_differ():
    """Cursors of one file move together: the file-level interval must reflect it."""
    rng = np.random.default_rng(3)
    files = [f"f{i // 50}" for i in range(1000)]  # 20 files
    file_effect = np.repeat(rng.normal(0, 2.0, 20), 50)  # the tuned model helps in some files, hurts in others
    parent = rng.normal(5, 1, 1000)
    tuned = parent + file_effect + rng.normal(0, 0.2, 1000)
    clustered = clustered_mean_difference("u", parent, tuned, files, seed=0, n_resamples=999)
    iid = clustered_mean_difference("u", parent, tuned, [str(i) for i in range(1000)], seed=0, n_resamples=999)
    width = lambda r: r.ci95[1] - r.ci95[0]  # noqa: E731
    assert width(clustered) > 3 * width(iid)


def test_sampling_tolerance_matches_the_binomial_error():
    assert sampling_tolerance(0.10, 164) == pytest.approx(0.046, abs=0.002)  # the issue's ±4.6 points
    assert 0.01 < sampling_tolerance(0.0, 164) < 0.03  # never 0: one lucky problem is not a regression
    assert sampling_tolerance(0.1, 1640) < sampling_tolerance(0.1, 164) / 3


def test_filter_threshold_maximises_utility_and_can_show_nothing():
    from rlhf.filter import best_threshold, fit

    p = np.array([0.9, 0.8, 0.3, 0.2, 0.1])
    chars = np.array([10.0, 0.0, 6.0, 0.0, 0.0])
    t, u = best_threshold(p, chars, cost=2.0)
    assert t == 0.3 and u == pytest.approx(14.0 / 5)  # top 3: 10 - 2 + 6; the last two would cost 2 each
    t, u = best_threshold(p, chars, cost=20.0)
    assert t == 0.9 and u == pytest.approx(2.0)  # a rejection now costs more than the 6 characters gain
    t, u = best_threshold(p, np.zeros(5), cost=2.0)
    assert t == np.inf and u == 0.0  # nothing is ever accepted: show nothing
    # Confident, long-ish suggestions get accepted, low-logprob ones do not: the filter learns it.
    rng = np.random.default_rng(0)
    rows = []
    for i in range(200):
        good = i % 3 == 0
        rows.append({"suggestion": " value" if good else " xq", "logprob": rng.normal(-0.5 if good else -3.0, 0.3),
                     "prefix_tail": "x = ", "lang": "python", "accepted": good, "accepted_chars": 6 if good else 0})
    f = fit(rows, cost=2.0, model_sha256="abc", seed=0)
    assert f.model_sha256 == "abc" and f.train_utility_filtered > f.train_utility_shown_all
    assert f.show(rows[0]) and not f.show(rows[1])


# ------------------------------------------------------------------------------------- the real gate
@pytest.fixture(scope="module")
def good_model(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model tuned on the gate's own cursors (FIM prompt -> the rest of the line) until it knows
    them: a model trained on the held-out distribution, whose replay scores well."""
    from rlhf.heldout import gate_cursors
    from tests.conftest import fim_tune

    out = tmp_path_factory.mktemp("good_model")
    params = gate_params(out, tiny_model_dir)
    cases = [(c.prefix, c.suffix, c.kept) for c in gate_cursors(gate_docs(), params)]
    return fim_tune(tiny_model_dir, out, cases, steps=100, max_new_tokens=params.rlhf.gate.max_tokens,
                    max_chars=params.feedback.simulate.max_context_chars)


def damaged(model_dir: Path, out: Path, scale: float) -> Path:
    """The same model with Gaussian noise of ``scale`` x each weight tensor's own std added (seeded)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() > 1:
                p.add_(torch.randn(p.shape, generator=g) * p.std() * scale)
    model.save_pretrained(out)
    for f in model_dir.glob("*token*"):
        shutil.copy2(f, out / f.name)
    return out


def gate_params(tmp: Path, model_dir: Path):
    base = rlhf_params(tmp, model_dir)
    data = base.model_dump(mode="json", exclude={"source_file"})
    data["eval"]["out"] = str(tmp / "reports/eval")
    data["eval"]["fim"].update(max_docs=4, max_new_tokens=12)
    data["eval"]["idioms"]["max_new_tokens"] = 4
    data["feedback"]["simulate"]["max_context_chars"] = 200
    data["rlhf"]["gate"].update(skip_humaneval=True, cursors_per_file=10, max_tokens=12, resamples=999)
    data["rlhf"]["filter"].update(enabled=False, cursors_per_file=10)
    return parse_params(data, "gate-params")


def gate_docs() -> list[dict]:
    return [{"id": n, "lang": "python", "path": n, "content": (STDLIB / n).read_text(encoding="utf-8")}
            for n in GATE_FILES]


@pytest.mark.slow
def test_gate_passes_a_model_against_itself_fails_a_damaged_one_and_sees_a_real_gain(tmp_path, good_model):
    from rlhf.gate import read_gate, run_gate

    params = gate_params(tmp_path, good_model)
    docs = gate_docs()
    parent = {"version": "base", "model_dir": str(good_model)}

    same = run_gate(params, parent, good_model, docs)
    assert same.passed and not same.significant and same.promote_to == "staff"
    u = same.paired["tests"]["utility"]
    assert u["diff"] == 0 and u["p_value"] == 1.0 and same.paired["cursors"] == 80 and same.paired["files"] == 8
    base = json.loads((tmp_path / "reports/eval/rlhf-parent/heldout.json").read_text())
    assert base["accepted_chars_per_cursor"] > 2.0  # the replay has signal to lose: the good model scores

    bad = damaged(good_model, tmp_path / "damaged", scale=0.6)
    worse = run_gate(params, parent, bad, docs)
    assert not worse.passed and not worse.significant and worse.promote_to is None
    u = worse.paired["tests"]["utility"]
    assert u["diff"] < 0 and u["ci95"][1] < 0 and u["p_value"] < 0.05
    assert any("utility" in r for r in worse.reasons)
    assert read_gate(params)["passed"] is False
    assert "gate: FAILED" in worse.table()

    # The other way round: the good model against the damaged one as parent is a significant gain; with the
    # suggestion filter on, the deployed version (model + filter fitted on *other* files) is judged too.
    from rlhf.tune import weights_hash

    with_filter = params.model_copy(update={"rlhf": params.rlhf.model_copy(update={
        "filter": params.rlhf.filter.model_copy(update={"enabled": True})})})
    filter_docs = [{"id": n, "lang": "python", "path": n, "content": (STDLIB / n).read_text(encoding="utf-8")}
                   for n in ("textwrap.py", "shlex.py", "string.py")]
    better = run_gate(with_filter, {"version": "damaged", "model_dir": str(bad)}, good_model, docs, filter_docs)
    assert better.passed and better.significant and better.promote_to == params.rlhf.gate.promote_to
    assert better.paired["mcnemar"]["only_tuned"] > better.paired["mcnemar"]["only_parent"]
    filt = json.loads((tmp_path / "reports/eval/rlhf-deployed/filter.json").read_text())
    assert filt["model_sha256"] == weights_hash(good_model) and filt["train_rows"] > 0
    assert better.paired["deployed"]["tests"]["utility"]["n"] == 80
    assert "deployed (model + filter)" in better.table()


def test_the_rule_judges_model_plus_filter_when_the_gateway_applies_filters(tmp_path):
    """What decides is what users get: with serve.suggestion_filter on, the deployed comparison (model + filter)."""
    from rlhf.gate import decide, deciding

    params = rlhf_params(tmp_path, tmp_path / "model")

    def test(lo, hi, p):
        return {"tests": {"utility": {"diff": (lo + hi) / 2, "ci95": [lo, hi], "p_value": p}}}

    paired = {**test(-0.5, 0.2, 0.4), "deployed": test(0.5, 1.0, 0.001)}
    off = params.model_copy(update={"serve": params.serve.model_copy(update={"suggestion_filter": False})})
    on = params.model_copy(update={"serve": params.serve.model_copy(update={"suggestion_filter": True})})
    assert deciding(paired, off) is paired and deciding(paired, on) is paired["deployed"]
    assert decide(paired, [], off)[:2] == (False, False)  # the model alone may be worse by more than the margin
    assert decide(paired, [], on)[:2] == (True, True)  # the deployed version's gain is significant
    assert decide(test(-0.5, 0.2, 0.4), [], on)[:2] == (False, False)  # no filter fitted: the model decides


def test_the_parent_reuses_the_evaluate_stage_only_for_the_weights_it_scored(tmp_path, tiny_model_dir):
    """Round 1's parent is the base model the `evaluate` stage already scored: the gate copies its HumanEval and
    idioms (same bytes as running them again), and runs them itself for other weights or a stale report."""
    from pipeline.eval.humaneval import run_humaneval
    from pipeline.eval.idioms import run_idioms
    from rlhf.gate import BASE_REUSABLE, reuse_base_evaluation

    data = gate_params(tmp_path, tiny_model_dir).model_dump(mode="json", exclude={"source_file"})
    data["eval"]["humaneval"].update(limit=2, max_new_tokens=8, k=[1])
    data["rlhf"]["gate"]["skip_humaneval"] = False
    params = parse_params(data, "reuse-params")
    out = Path(params.eval.out)
    for name in (params.eval.name, "again"):  # the evaluate stage's reports, and the same evaluation run again
        run_humaneval(params, name, str(tiny_model_dir))
        run_idioms(params, name, str(tiny_model_dir))

    assert reuse_base_evaluation(params, "rlhf-parent", tiny_model_dir) == {"humaneval", "idioms"}
    for f in [f for files in BASE_REUSABLE.values() for f in files]:
        assert (out / "rlhf-parent" / f).read_bytes() == (out / "again" / f).read_bytes(), f

    other = damaged(tiny_model_dir, tmp_path / "other", scale=0.1)
    assert reuse_base_evaluation(params, "rlhf-tuned", other) == set()
    assert not (out / "rlhf-tuned").exists()

    report = out / params.eval.name / "idioms.json"
    stale = json.loads(report.read_text())
    report.write_text(json.dumps({**stale, "model_sha256": "0" * 64}))  # a report of other weights
    assert reuse_base_evaluation(params, "rlhf-parent2", tiny_model_dir) == {"humaneval"}


def test_a_filtered_parent_is_judged_with_its_filter_not_as_the_model_alone(tmp_path, tiny_model_dir):
    """From round 2 on (and in production) the parent is served with its own suggestion filter. The same model
    with the same filter is then no gain at all for users; against the parent model alone it would look like one
    (the filter's silence counted as an improvement)."""
    from rlhf.filter import train_filter
    from rlhf.gate import run_gate

    params = gate_params(tmp_path, tiny_model_dir)
    params = params.model_copy(update={"rlhf": params.rlhf.model_copy(update={
        "filter": params.rlhf.filter.model_copy(update={"enabled": True})})})
    docs = gate_docs()
    filter_docs = [{"id": n, "lang": "python", "path": n, "content": (STDLIB / n).read_text(encoding="utf-8")}
                   for n in ("textwrap.py", "shlex.py", "string.py")]
    filt = train_filter(tiny_model_dir, params, filter_docs)  # what the gate fits for the tuned side, too

    alone = run_gate(params, {"version": "v1", "model_dir": str(tiny_model_dir)}, tiny_model_dir, docs, filter_docs)
    assert alone.paired["deployed"]["against"] == "parent model"
    silence = alone.paired["deployed"]["tests"]["utility"]["diff"]
    assert silence != 0  # the filter changes what is shown, so "model + filter vs model" is not a null comparison

    parent = {"version": "v1", "model_dir": str(tiny_model_dir), "filter": filt.to_json()}
    same = run_gate(params, parent, tiny_model_dir, docs, filter_docs)
    d = same.paired["deployed"]
    assert d["against"] == "parent + its filter"
    assert d["tests"]["utility"]["diff"] == 0 and d["tests"]["utility"]["p_value"] == 1.0
    assert not same.significant and same.promote_to == "staff"
    assert (tmp_path / "reports/eval/rlhf-deployed/parent/heldout.json").is_file()
    assert "against the parent + its own filter" in same.table()
