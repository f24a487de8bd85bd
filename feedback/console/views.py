"""What each console page shows from the feedback store, through the functions `ownllm feedback report` uses.

Acceptance counts, rates and intervals come from :mod:`feedback.analytics` (``acceptance``,
``experiment_report``), the registry and rollout from :mod:`feedback.store`. The only numbers computed here
are plain counts the report has no column for (users per A/B arm, versions per rollout state).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from feedback import analytics, store
from feedback.models import Completion, Experiment, ModelVersion, RolloutState, User

# The Overview's chart: one point per day over this many days, per version, one chart per language.
CHART_DAYS = 14


def day_start(t: datetime) -> datetime:
    return t.replace(hour=0, minute=0, second=0, microsecond=0)


def deployed(s: Session) -> dict[str, list[str]]:
    """Version names per rollout state, in the order staff → ab → all → retired."""
    out: dict[str, list[str]] = {st.value: [] for st in RolloutState}
    for v in store.list_versions(s):
        label = f"{v.name} ({store.rollout_label(v)})" if v.rollout_state == RolloutState.ab else v.name
        out[v.rollout_state.value].append(label)
    return out


def overview(s: Session, user: User, now: datetime, ignored_after_s: float) -> dict[str, Any]:
    """Acceptance per version x language over the last day and week, and per day for the chart.

    Staff see every user's completions; any other key sees its own (``acceptance(user_id=...)``).
    """
    uid = None if user.is_staff else user.id
    windows = {name: analytics.acceptance(s, now - delta, None, True, user_id=uid, ignored_after_s=ignored_after_s)
               for name, delta in (("day", timedelta(days=1)), ("week", timedelta(days=7)))}
    first = day_start(now) - timedelta(days=CHART_DAYS - 1)
    days = [(first + timedelta(days=i)).strftime("%Y-%m-%d") for i in range(CHART_DAYS)]
    series: dict[str, dict[str, list[float | None]]] = {}  # language → version → rate per day
    for row in analytics.acceptance(s, first, None, True, user_id=uid, by_day=True, ignored_after_s=ignored_after_s):
        if row["day"] in days:  # (a row stamped after `now` by a clock step is left out of the chart)
            rates = series.setdefault(row["language"], {}).setdefault(row["model"], [None] * CHART_DAYS)
            rates[days.index(row["day"])] = row["rate"]
    xs = [int((first + timedelta(days=i) - datetime(1970, 1, 1)).total_seconds()) for i in range(CHART_DAYS)]
    charts = [{"language": lang, "x": xs,
               "series": [{"label": model, "values": vals} for model, vals in sorted(by_model.items())]}
              for lang, by_model in sorted(series.items())]
    return {"scope": "all users" if user.is_staff else f"your completions ({user.name})", "windows": windows,
            "charts": charts, "deployed": deployed(s)}


def versions(s: Session) -> list[dict[str, Any]]:
    rows = []
    for v in store.list_versions(s):
        ev = v.eval_results or {}
        gate = ev.get("gate") if isinstance(ev.get("gate"), dict) else None
        rows.append({"name": v.name, "state": store.rollout_label(v), "rollout_state": v.rollout_state.value,
                     "parent": v.parent.name if v.parent else None, "git_rev": v.git_rev,
                     "dvc_lock_hash": v.dvc_lock_hash, "snapshot_hash": v.snapshot_hash, "model_hash": v.model_hash,
                     "path": v.path, "created_at": v.created_at, "promoted_at": v.promoted_at, "gate": gate,
                     "evals": {k: val for k, val in ev.items() if k not in ("gate", "lineage")},
                     "commands": (ev.get("lineage") or {}).get("commands") if isinstance(ev.get("lineage"), dict)
                     else None})
    return rows


def arm_users(s: Session, exp: Experiment) -> dict[str, int]:
    """Distinct users served by each arm (a count the A/B report has no column for)."""
    q = (select(ModelVersion.name, func.count(func.distinct(Completion.user_id)))
         .join(ModelVersion, ModelVersion.id == Completion.model_version_id)
         .where(Completion.experiment_id == exp.id).group_by(ModelVersion.name))
    return dict(s.execute(q).all())


def experiments(s: Session, since: datetime | None, alpha: float, power: float,
                ignored_after_s: float) -> list[dict[str, Any]]:
    """Every experiment, newest first, as ``analytics.experiment_report`` reports it, plus users per arm."""
    out = []
    for exp in s.scalars(select(Experiment).order_by(Experiment.id.desc())):
        rep = analytics.experiment_report(s, exp, alpha, power, since, None, ignored_after_s)
        users = arm_users(s, exp)
        for arm in rep["arms"]:
            arm.setdefault("users", users.get(arm["model"], 0))
        rep["created_at"], rep["stopped_at"] = exp.created_at, exp.stopped_at
        out.append(rep)
    return out
