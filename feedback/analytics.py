"""Acceptance analytics: rates per model version x language with 95% intervals, and the A/B verdict.

Counting happens in the database (one GROUP BY per question, using the (version, language, time)
index); Python only turns the few aggregated rows into intervals and tests:
- Wilson score interval for a binomial rate (statsmodels; sound at small n and near 0 or 1);
- the A/B difference between arms clustered by user: users are what ``feedback.routing`` randomises, and one
  user's choices are not independent of each other (one heavy user can make a difference look certain when
  choices are counted). The difference comes from a linear probability model (statsmodels OLS of
  accepted-or-not on the arm) with cluster-robust standard errors grouped by user, t with users − 1 degrees
  of freedom; the two-proportion z-test counting choices is kept beside it (``by_choice``) for comparison;
- the per-arm sample size that would detect the observed difference at the configured alpha and power,
  inflated by the design effect the clustering measured.
"""

from __future__ import annotations

import math
from collections import defaultdict
from datetime import datetime, timedelta
from statistics import NormalDist
from typing import Any

from sqlalchemy import and_, case, func, select, true
from sqlalchemy.orm import Session

from feedback.models import (Completion, Experiment, ExperimentArm, FeedbackEvent, FeedbackKind, ModelVersion,
                             ServeStatus, utcnow)

# Shown: served whole. A completion the suggestion filter hid (status ``filtered``) is in the window and
# counted in ``filtered``, but no decision, view or A/B outcome of it counts: the user saw nothing.
SHOWN = Completion.status == ServeStatus.served.value

Z95 = NormalDist().inv_cdf(0.975)


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval (statsmodels); (0, 1) when nothing was observed."""
    from scipy.stats import norm
    from statsmodels.stats.proportion import proportion_confint

    if n == 0:
        return 0.0, 1.0
    lo, hi = proportion_confint(successes, n, alpha=2 * norm.sf(z), method="wilson")
    return max(0.0, float(lo)), min(1.0, float(hi))


def two_proportion_test(x1: int, n1: int, x2: int, n2: int) -> dict[str, float | None]:
    """Difference p2 - p1 with its z statistic and two-sided p-value (pooled standard error)."""
    if n1 == 0 or n2 == 0:
        return {"diff": None, "z": None, "p_value": None}
    p1, p2 = x1 / n1, x2 / n2
    pooled = (x1 + x2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return {"diff": p2 - p1, "z": 0.0, "p_value": 1.0}
    z = (p2 - p1) / se
    return {"diff": p2 - p1, "z": z, "p_value": 2 * (1 - NormalDist().cdf(abs(z)))}


def needed_per_arm(p1: float, p2: float, alpha: float, power: float) -> int | None:
    """Per-arm n for a two-sided test to detect p1 vs p2 (normal approximation); None when p1 == p2."""
    if p1 == p2:
        return None
    za, zb = NormalDist().inv_cdf(1 - alpha / 2), NormalDist().inv_cdf(power)
    pbar = (p1 + p2) / 2
    num = (za * math.sqrt(2 * pbar * (1 - pbar)) + zb * math.sqrt(p1 * (1 - p1) + p2 * (1 - p2))) ** 2
    return math.ceil(num / (p2 - p1) ** 2)


def _rate(accepted: int, decided: int, ignored: int = 0) -> dict[str, Any]:
    """The rate's denominator is every completion the user saw and settled: decided (accept/reject) plus
    ignored (viewed, then neither within ``feedback.ignored_after_s``). Clients without view events (the
    simulated user, the OpenAI path) have ignored = 0, so their rate is accepted / decided as before."""
    shown = decided + ignored
    lo, hi = wilson(accepted, shown)
    return {"accepted": accepted, "decided": decided, "rejected": decided - accepted, "ignored": ignored,
            "shown": shown, "rate": accepted / shown if shown else None, "ci95": [lo, hi]}


def _ignored(now: datetime, ignored_after_s: float):
    """Viewed, no decision, and the view older than the window: counted when the query runs, not stored.

    A query-time rule rather than a sweeper writing FeedbackKind.ignored: a late select or dismiss still
    lands (a stored 'ignored' would contradict it), nothing has to run on a schedule, and a changed window
    in params re-reads all history the same way. Continue's own 10 s rule is the default.
    """
    cutoff = now - timedelta(seconds=ignored_after_s)
    return func.sum(case((and_(FeedbackEvent.id.is_(None), Completion.viewed_at.is_not(None),
                               Completion.viewed_at < cutoff, SHOWN), 1), else_=0))


def _window(since: datetime | None, until: datetime | None, user_id: int | None = None):
    """Completions in the window that were served, or hidden by the suggestion filter (``filtered``: counted
    as such, never as shown): a row still ``pending`` (being generated or streamed), or
    ``disconnected``/``failed`` (the client never saw all of it), was not shown and counts nowhere."""
    conds = [Completion.status.in_([ServeStatus.served.value, ServeStatus.filtered.value])]
    if user_id is not None:
        conds.append(Completion.user_id == user_id)
    if since is not None:
        conds.append(Completion.created_at >= since)
    if until is not None:
        conds.append(Completion.created_at < until)
    return and_(true(), *conds)


def acceptance(s: Session, since: datetime | None = None, until: datetime | None = None,
               by_language: bool = True, user_id: int | None = None, by_day: bool = False,
               ignored_after_s: float = 10.0) -> list[dict[str, Any]]:
    """Served, viewed, decided, ignored and accepted counts per version (x language), aggregated by the database.

    ``user_id`` restricts the counts to one user's completions (the console's own-usage view); ``by_day``
    splits every cell per UTC calendar day (``"day": "YYYY-MM-DD"``, the console's time series), in one query."""
    accepted = func.sum(case((FeedbackEvent.kind == FeedbackKind.accepted, 1), else_=0))
    day = func.date(Completion.created_at)  # SQLite: 'YYYY-MM-DD' text; PostgreSQL: a date
    names = (["day"] if by_day else []) + ["model"] + (["language"] if by_language else [])
    keys = ([day] if by_day else []) + [ModelVersion.name] + ([Completion.language] if by_language else [])
    served = func.sum(case((SHOWN, 1), else_=0))
    filtered = func.sum(case((SHOWN, 0), else_=1))
    q = (select(*keys, served, filtered, func.count(Completion.viewed_at),
                _ignored(until or utcnow(), ignored_after_s), func.count(FeedbackEvent.id), accepted)
         .select_from(Completion)
         .join(ModelVersion, ModelVersion.id == Completion.model_version_id)
         .outerjoin(FeedbackEvent, and_(FeedbackEvent.completion_id == Completion.id, SHOWN))
         .where(_window(since, until, user_id)).group_by(*keys).order_by(*keys))
    out = []
    for row in s.execute(q):
        served, hidden, viewed, ignored, decided, acc = (int(row[-6] or 0), int(row[-5] or 0), row[-4],
                                                         int(row[-3] or 0), row[-2], int(row[-1] or 0))
        item = {name: str(value) for name, value in zip(names, row)}
        out.append({**item, "served": served, "filtered": hidden, "viewed": viewed, **_rate(acc, decided, ignored)})
    return out


AB_RESAMPLES = 4999
BCA_MAX_USERS = 400
AB_SEED = 0  # fixed: the same counts give the same CI and p-value on every page load and report


def clustered_difference(cells: list[tuple[Any, int, int, int]], n_resamples: int = AB_RESAMPLES,
                         seed: int = AB_SEED) -> dict[str, Any]:
    """Treatment − control acceptance (pooled rates) with a CI and p-value that resample users, not choices.

    ``cells`` are (user, arm, accepted, shown) with arm 0 = control, 1 = treatment. Users are what routing
    randomises, so they are the unit: the CI is a user-level bootstrap (scipy.stats.bootstrap resampling each
    arm's users, BCa, percentile when BCa fails on few users), the p-value a permutation test that reassigns
    whole users between arms (scipy.stats.permutation_test; exact when there are few users). A cluster-robust
    OLS (statsmodels) was tried first and rejected: its sandwich error is near zero for the user who makes
    most of an arm's choices (the pooled rate is fitted to that user, so their residual vanishes), and it
    called one heavy user's preference significant (tests/feedback/test_analytics.py). ``design_effect`` is
    the bootstrap variance over the variance counting choices as independent (unpooled binomial): roughly how
    many choices one independent observation is worth. Needs at least 2 users with shown completions per arm.
    """
    import warnings

    import numpy as np
    from scipy import stats

    live = [c for c in cells if c[3] > 0]
    users = [{c[0] for c in live if c[1] == arm} for arm in (0, 1)]
    out: dict[str, Any] = {"users": len(users[0] | users[1]), "users_per_arm": [len(users[0]), len(users[1])],
                           "diff": None, "ci95": None, "p_value": None, "design_effect": None,
                           "method": "user bootstrap CI, user permutation p"}
    if min(out["users_per_arm"]) < 2:
        return out
    acc = np.array([c[2] for c in live], dtype=float)
    shown = np.array([c[3] for c in live], dtype=float)
    arm = np.array([c[1] for c in live])
    # Samples are indices into the (user, arm) cells, so a resample keeps each user's accepted and shown together.
    control, treatment = np.flatnonzero(arm == 0).astype(float), np.flatnonzero(arm == 1).astype(float)

    def pooled_diff(c, t, axis=-1):
        c, t = c.astype(np.int64), t.astype(np.int64)
        return acc[t].sum(axis=axis) / shown[t].sum(axis=axis) - acc[c].sum(axis=axis) / shown[c].sum(axis=axis)

    diff = float(pooled_diff(control, treatment))
    n1, n2 = shown[arm == 0].sum(), shown[arm == 1].sum()
    p1, p2 = acc[arm == 0].sum() / n1, acc[arm == 1].sum() / n2
    naive_var = p1 * (1 - p1) / n1 + p2 * (1 - p2) / n2
    # BCa corrects the percentile interval's bias at few users; its jackknife costs users², and past a few
    # hundred users the percentile interval is as good, so large experiments use it directly.
    method = "BCa" if out["users"] <= BCA_MAX_USERS else "percentile"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BCa on few users (or a degenerate spread) warns; handled below
        res = stats.bootstrap((control, treatment), pooled_diff, vectorized=True, n_resamples=n_resamples,
                              method=method, rng=np.random.default_rng(seed))
        lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            res = stats.bootstrap((control, treatment), pooled_diff, vectorized=True, n_resamples=n_resamples,
                                  method="percentile", rng=np.random.default_rng(seed))
            lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    perm = stats.permutation_test((control, treatment), pooled_diff, permutation_type="independent",
                                  vectorized=True, n_resamples=n_resamples, alternative="two-sided",
                                  rng=np.random.default_rng(seed + 1))
    se = float(res.standard_error)
    out.update(diff=diff, ci95=[min(lo, diff), max(hi, diff)], p_value=float(perm.pvalue),
               method=f"user bootstrap ({method}) CI, user permutation p",
               design_effect=float(se ** 2 / naive_var) if naive_var > 0 else None)
    return out


def experiment_report(s: Session, exp: Experiment, alpha: float, power: float,
                      since: datetime | None = None, until: datetime | None = None,
                      ignored_after_s: float = 10.0) -> dict[str, Any]:
    """Arms' acceptance on the traffic the experiment routed, the difference clustered by user, and the verdict.

    One query counts per (arm, user); the arms' rates are sums over their users, the test clusters by user
    (:func:`clustered_difference`). ``by_choice`` keeps the z-test that counts choices as independent, which is
    optimistic whenever a few users make most choices."""
    accepted = func.sum(case((FeedbackEvent.kind == FeedbackKind.accepted, 1), else_=0))
    q = (select(ExperimentArm.id, ExperimentArm.name, ModelVersion.name, ExperimentArm.traffic_share,
                Completion.user_id, func.count(FeedbackEvent.id), _ignored(until or utcnow(), ignored_after_s),
                accepted)
         .select_from(ExperimentArm)
         .join(ModelVersion, ModelVersion.id == ExperimentArm.model_version_id)
         .outerjoin(Completion, and_(Completion.experiment_id == ExperimentArm.experiment_id,
                                     Completion.model_version_id == ExperimentArm.model_version_id,
                                     _window(since, until), SHOWN))
         .outerjoin(FeedbackEvent, FeedbackEvent.completion_id == Completion.id)
         .where(ExperimentArm.experiment_id == exp.id)
         .group_by(ExperimentArm.id, ExperimentArm.name, ModelVersion.name, ExperimentArm.traffic_share,
                   Completion.user_id)
         .order_by(ExperimentArm.id, Completion.user_id))
    per_arm: dict[int, dict[str, Any]] = {}
    sums: dict[int, list[int]] = defaultdict(lambda: [0, 0, 0])  # decided, ignored, accepted
    per_user: list[tuple[int, int, int, int]] = []  # (arm id, user, accepted, shown)
    for arm_id, a, m, share, user, decided, ignored, acc in s.execute(q):
        per_arm.setdefault(arm_id, {"arm": a, "model": m, "traffic_share": share})
        decided, ignored, acc = int(decided or 0), int(ignored or 0), int(acc or 0)
        for i, v in enumerate((decided, ignored, acc)):
            sums[arm_id][i] += v
        if user is not None:
            per_user.append((arm_id, user, acc, decided + ignored))
    arms = [{**info, **_rate(sums[i][2], sums[i][0], sums[i][1]),
             "users_shown": sum(1 for a, _, _, n in per_user if a == i and n > 0)} for i, info in per_arm.items()]
    out: dict[str, Any] = {"experiment": exp.name, "status": exp.status.value, "arms": arms, "counts": "users"}
    if len(arms) != 2:
        out["verdict"] = "needs exactly two arms"
        return out
    c, t = arms
    control_id = next(iter(per_arm))
    out["by_choice"] = two_proportion_test(c["accepted"], c["shown"], t["accepted"], t["shown"])
    test = clustered_difference([(u, 0 if a == control_id else 1, acc, n) for a, u, acc, n in per_user])
    out.update(test)
    if c["shown"] == 0 or t["shown"] == 0:
        out.update(significant=False, needed_per_arm=None, verdict="no decided completions in one of the arms yet")
        return out
    if test["p_value"] is None:
        out.update(significant=False, needed_per_arm=None,
                   verdict=(f"not enough users to test: the difference is clustered by user and needs at least 2 "
                            f"users with shown completions in each arm (control {test['users_per_arm'][0]}, "
                            f"treatment {test['users_per_arm'][1]})"))
        return out
    deff = max(1.0, test["design_effect"] or 1.0)
    need = needed_per_arm(c["rate"], t["rate"], alpha, power)
    need = None if need is None else math.ceil(need * deff)
    significant = test["p_value"] < alpha
    out.update(significant=significant, alpha=alpha, power=power, needed_per_arm=need)
    users = (f"{test['users']} users ({test['users_per_arm'][0]} control, {test['users_per_arm'][1]} treatment), "
             f"clustered by user")
    ci = f"95% CI [{test['ci95'][0]:+.1%}, {test['ci95'][1]:+.1%}]"
    better = "treatment" if test["diff"] > 0 else "control"
    if significant:
        out["verdict"] = (f"significant counting {users}: {better} is better by {abs(test['diff']):.1%} "
                          f"({ci}, p={test['p_value']:.3g} < {alpha})")
    elif need is None:
        out["verdict"] = f"not significant counting {users}: the arms' rates are identical"
    else:
        have = min(c["shown"], t["shown"])
        out["verdict"] = (f"not significant counting {users} ({ci}, p={test['p_value']:.3g}); a true difference of "
                          f"{abs(test['diff']):.1%} needs about {need} shown completions per arm "
                          f"(have {have}; design effect {deff:.2f}) at alpha={alpha}, power={power}")
    return out


def report(s: Session, since: datetime | None, until: datetime | None, alpha: float = 0.05,
           power: float = 0.8, ignored_after_s: float = 10.0) -> dict[str, Any]:
    exps = s.scalars(select(Experiment).order_by(Experiment.id)).all()
    return {"by_version_language": acceptance(s, since, until, True, ignored_after_s=ignored_after_s),
            "by_version": acceptance(s, since, until, False, ignored_after_s=ignored_after_s),
            "experiments": [experiment_report(s, e, alpha, power, since, until, ignored_after_s) for e in exps]}


def plot(rep: dict[str, Any], path) -> None:
    """Acceptance per version x language with 95% Wilson error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rep["by_version_language"] if r["shown"]]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(rows) + 2), 3.6))
    if rows:
        labels = [f"{r['model']}\n{r['language']}" for r in rows]
        rates = [r["rate"] for r in rows]
        # clipped at 0: at a rate of 0 or 1 the interval's bound equals the rate up to float rounding, and
        # matplotlib refuses an error bar of -1e-17
        err = [[max(0.0, r["rate"] - r["ci95"][0]) for r in rows], [max(0.0, r["ci95"][1] - r["rate"]) for r in rows]]
        ax.bar(range(len(rows)), rates, yerr=err, capsize=4, color="#4c72b0")
        ax.set_xticks(range(len(rows)), labels, fontsize=8)
        for i, r in enumerate(rows):
            ax.text(i, min(r["ci95"][1] + 0.02, 0.95), f"n={r['shown']}", ha="center", fontsize=7)
    else:
        ax.text(0.5, 0.5, "no feedback in the window", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylim(0, 1)
    ax.set_ylabel("acceptance rate (95% CI)")
    ax.set_title("Acceptance by model version and language", fontsize=10)
    fig.tight_layout()
    # No Software/date metadata, so the same numbers give the same bytes.
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


def render(rep: dict[str, Any]) -> str:
    """The report as a plain-text table for the terminal."""
    lines = [f"{'model':<20} {'language':<12} {'served':>7} {'filtered':>8} {'viewed':>7} {'decided':>8} {'ignored':>8} "
             f"{'accepted':>9} {'rate':>7}  95% CI"]
    for r in rep["by_version_language"]:
        rate = "-" if r["rate"] is None else f"{r['rate']:.3f}"
        lines.append(f"{r['model']:<20} {r['language']:<12} {r['served']:>7} {r.get('filtered', 0):>8} {r['viewed']:>7} "
                     f"{r['decided']:>8} "
                     f"{r['ignored']:>8} {r['accepted']:>9} "
                     f"{rate:>7}  [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]")
    for e in rep["experiments"]:
        lines.append(f"A/B {e['experiment']} ({e['status']}): {e['verdict']}")
    return "\n".join(lines)
