"""Acceptance analytics: SQL aggregation on both databases, Wilson intervals, the A/B test and its verdict."""

from __future__ import annotations

from datetime import timedelta

import pytest

from feedback import store
from feedback.analytics import acceptance, needed_per_arm, report, two_proportion_test, wilson
from feedback.db import session_factory
from feedback.models import Completion, FeedbackKind, utcnow


def test_wilson_matches_known_values():
    lo, hi = wilson(8, 10)  # textbook example: 0.8 of 10 → [0.490, 0.943]
    assert (round(lo, 3), round(hi, 3)) == (0.49, 0.943)
    assert wilson(0, 0) == (0.0, 1.0)
    assert wilson(0, 20)[0] == pytest.approx(0.0, abs=1e-12) and wilson(20, 20)[1] == pytest.approx(1.0)


def test_two_proportion_test_and_sample_size():
    t = two_proportion_test(30, 100, 45, 100)
    assert t["diff"] == pytest.approx(0.15) and t["z"] == pytest.approx(2.1909, abs=1e-3)  # 0.15 / sqrt(.375 * .625 * 2/100)
    assert t["p_value"] == pytest.approx(0.0285, abs=1e-3)
    assert needed_per_arm(0.30, 0.45, 0.05, 0.8) == 163  # G*Power / standard formula: 163 per arm
    assert needed_per_arm(0.3, 0.3, 0.05, 0.8) is None


def _fill(s, version, user, lang, accepted, rejected, undecided=0, exp_id=None, age_days=0.0, prefix="",
          status="served"):
    n = 0
    for kind, count in ((FeedbackKind.accepted, accepted), (FeedbackKind.rejected, rejected), (None, undecided)):
        for _ in range(count):
            rid = f"cmpl-{prefix}{version.name}-{lang}-{user.name}-{n}"
            n += 1
            s.add(Completion(request_id=rid, choice_index=0, user_id=user.id, model_version_id=version.id,
                             experiment_id=exp_id, language=lang, prompt="p", completion="c", prompt_hash="h",
                             finish_reason="stop", prompt_tokens=1, completion_tokens=1, latency_ms=1.0,
                             created_at=utcnow() - timedelta(days=age_days), status=status))
            s.flush()
            if kind is not None:
                store.record_feedback(s, user, [store.FeedbackInput(rid, kind)])


def _ab(s, n_users: int):
    users = [store.get_or_create_user(s, f"user-{i}") for i in range(n_users)]
    base = store.register_model_version(s, "base", "models/base", state="all")
    tuned = store.register_model_version(s, "tuned", "models/tuned")
    store.promote(s, "tuned", "ab:50")
    return users, base, tuned, store.running_experiment(s)


# Accepted of 10 shown per user: the control's 10 users average 3 of 10, the treatment's 4.5 of 10, with spread.
CONTROL_10 = [1, 2, 3, 4, 5, 2, 3, 4, 3, 3]
TREATMENT_10 = [3, 4, 5, 6, 4, 5, 3, 6, 4, 5]


def test_report_aggregates_in_the_database_with_window_and_ab_verdict(db_url):
    f = session_factory(db_url)
    with f.begin() as s:
        users, base, tuned, exp = _ab(s, 20)
        for u, acc in zip(users[:10], CONTROL_10):
            _fill(s, base, u, "python", acc, 10 - acc, exp_id=exp.id)
        for u, acc in zip(users[10:], TREATMENT_10):
            _fill(s, tuned, u, "python", acc, 10 - acc, exp_id=exp.id)
        _fill(s, base, users[0], "python", 0, 0, undecided=5, exp_id=exp.id, prefix="open")
        _fill(s, base, users[0], "c", 2, 3)
        _fill(s, base, users[0], "c", 9, 0, age_days=10, prefix="old")  # outside a 7-day window
    with f() as s:
        rep = report(s, utcnow() - timedelta(days=7), None)
    cells = {(r["model"], r["language"]): r for r in rep["by_version_language"]}
    assert set(cells) == {("base", "c"), ("base", "python"), ("tuned", "python")}
    py = cells[("base", "python")]
    assert (py["served"], py["decided"], py["accepted"], py["rejected"]) == (105, 100, 30, 70)
    assert py["rate"] == pytest.approx(0.3) and py["ci95"] == pytest.approx(list(wilson(30, 100)))
    assert cells[("base", "c")]["decided"] == 5  # the 10-day-old ones are outside the window
    assert {r["model"]: r["decided"] for r in rep["by_version"]} == {"base": 105, "tuned": 100}
    (ab,) = rep["experiments"]
    assert [a["arm"] for a in ab["arms"]] == ["control", "treatment"]
    assert [a["users_shown"] for a in ab["arms"]] == [10, 10] and ab["users"] == 20
    assert ab["by_choice"]["p_value"] == pytest.approx(0.0285, abs=1e-3)  # 30/100 vs 45/100 counting choices
    # Clustered by user: the same difference; the t-test on 20 users (19 df) with this spread is still < 0.05.
    assert ab["diff"] == pytest.approx(0.15) and ab["ci95"][0] > 0 and ab["p_value"] < 0.05
    assert ab["significant"] is True and ab["counts"] == "users"
    assert ab["verdict"].startswith("significant counting 20 users (10 control, 10 treatment), clustered by user")
    assert "treatment is better by 15.0%" in ab["verdict"]
    with f() as s:  # without a window: everything
        assert {r["model"]: r["decided"] for r in report(s, None, None)["by_version"]}["base"] == 114


def test_only_served_completions_count_as_shown(db_url):
    """A row still pending (being generated or streamed), disconnected or failed was not shown whole: it counts
    in no served, decided or acceptance number, nor in an A/B arm (with the status filter removed this fails)."""
    f = session_factory(db_url)
    with f.begin() as s:
        users, base, tuned, exp = _ab(s, 4)
        for u in users[:2]:
            _fill(s, base, u, "python", 1, 1, exp_id=exp.id)
        for u in users[2:]:
            _fill(s, tuned, u, "python", 2, 0, exp_id=exp.id)
        for status in ("pending", "disconnected", "failed"):
            _fill(s, base, users[0], "python", 3, 0, undecided=2, exp_id=exp.id, prefix=status, status=status)
            _fill(s, tuned, users[2], "python", 0, 3, exp_id=exp.id, prefix=status, status=status)
            _fill(s, base, users[1], "rust", 1, 1, prefix=status, status=status)  # a cell with nothing served
    with f() as s:
        rep = report(s, None, None)
        mine = acceptance(s, user_id=users[0].id)
    cells = {(r["model"], r["language"]): r for r in rep["by_version_language"]}
    assert set(cells) == {("base", "python"), ("tuned", "python")}
    assert (cells[("base", "python")]["served"], cells[("base", "python")]["decided"],
            cells[("base", "python")]["accepted"]) == (4, 4, 2)
    assert (cells[("tuned", "python")]["served"], cells[("tuned", "python")]["accepted"]) == (4, 4)
    assert [(r["served"], r["accepted"]) for r in mine] == [(2, 1)]
    (ab,) = rep["experiments"]
    assert [(a["shown"], a["accepted"]) for a in ab["arms"]] == [(4, 2), (4, 4)]


def test_ab_verdict_when_not_significant(db_url):
    f = session_factory(db_url)
    with f.begin() as s:
        users, base, tuned, exp = _ab(s, 4)
        for u, acc in zip(users[:2], (1, 2)):
            _fill(s, base, u, "python", acc, 5 - acc, exp_id=exp.id)
        for u, acc in zip(users[2:], (2, 3)):
            _fill(s, tuned, u, "python", acc, 5 - acc, exp_id=exp.id)
    with f() as s:
        (ab,) = report(s, None, None)["experiments"]
    assert ab["significant"] is False and ab["p_value"] > 0.05 and ab["ci95"][0] <= 0 < ab["ci95"][1]
    # the sample size is the choice-counting one times the design effect of clustering (at least 1)
    assert ab["needed_per_arm"] >= needed_per_arm(0.3, 0.5, 0.05, 0.8)
    assert f"needs about {ab['needed_per_arm']} shown completions per arm (have 10;" in ab["verdict"]
    assert ab["verdict"].startswith("not significant counting 4 users (2 control, 2 treatment), clustered by user")


def test_one_user_making_most_choices_is_not_significant_when_users_are_counted(db_url):
    """Counting choices, 1 heavy user who likes the treatment makes it look certain (p < 1e-6); users are what
    routing randomises, and 10 treatment users of whom 9 accept like the control's are no evidence."""
    f = session_factory(db_url)
    with f.begin() as s:
        users, base, tuned, exp = _ab(s, 20)
        for u, acc in zip(users[:10], CONTROL_10):
            _fill(s, base, u, "python", acc, 10 - acc, exp_id=exp.id)
        _fill(s, tuned, users[10], "python", 120, 60, exp_id=exp.id)  # the heavy user: 180 choices, 2/3 accepted
        for u, acc in zip(users[11:], (0, 1, 1, 0, 1, 0, 1, 0, 1)):
            _fill(s, tuned, u, "python", acc, 2 - acc, exp_id=exp.id)
    with f() as s:
        (ab,) = report(s, None, None)["experiments"]
    choice = two_proportion_test(30, 100, 125, 198)
    assert ab["by_choice"] == pytest.approx(choice) and choice["p_value"] < 1e-6  # "significant" counting choices
    assert ab["diff"] == pytest.approx(choice["diff"])  # the same point estimate ...
    assert ab["significant"] is False and ab["p_value"] > 0.05 and ab["ci95"][0] < 0  # ... but no evidence
    assert ab["design_effect"] > 10  # one heavy user: ~200 choices are worth a handful of independent ones
    assert ab["verdict"].startswith("not significant counting 20 users (10 control, 10 treatment)")


def test_ab_with_one_user_per_arm_says_it_cannot_test(db_url):
    f = session_factory(db_url)
    with f.begin() as s:
        users, base, tuned, exp = _ab(s, 2)
        _fill(s, base, users[0], "python", 30, 70, exp_id=exp.id)
        _fill(s, tuned, users[1], "python", 45, 55, exp_id=exp.id)
    with f() as s:
        (ab,) = report(s, None, None)["experiments"]
    assert ab["by_choice"]["p_value"] < 0.05 and ab["p_value"] is None and ab["significant"] is False
    assert ab["verdict"].startswith("not enough users to test") and "(control 1, treatment 1)" in ab["verdict"]


def test_the_acceptance_plot_takes_rates_of_0_and_1_for_any_count(tmp_path):
    """At a rate of 0 or 1 the Wilson bound equals the rate up to float rounding; a bar of -1e-17 made matplotlib
    refuse the plot (the simulate stage failed on some counts)."""
    from feedback.analytics import plot, wilson

    rows = [{"model": "m", "language": f"l{n}", "shown": n, "rate": float(k == n), "ci95": list(wilson(k, n))}
            for n in range(1, 400) for k in (0, n)]
    plot({"by_version_language": rows}, tmp_path / "acceptance.png")
    assert (tmp_path / "acceptance.png").stat().st_size > 0
