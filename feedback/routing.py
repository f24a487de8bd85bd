"""Which model version serves a user: rollout state, then the running A/B experiment, then everyone's version.

- staff users get the newest ``staff`` version when there is one (dogfooding before anyone else);
- while an experiment runs, a user's arm is a stable hash of (experiment, user): the same user always
  lands in the same arm, and arms get traffic in proportion to their shares;
- otherwise the version in state ``all``.
A client may also name a version in ``model``: staff may pick any version that is not retired, other
users only the one they would be routed to or the version serving everyone.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from feedback.models import ModelVersion, RolloutState, User
from feedback.store import current_all, running_experiment

# Names that mean "route me" rather than a specific version.
ROUTED_ALIASES = {"auto", "ownllm", "default"}


class NoModel(LookupError):
    """No version can serve this user (nothing registered or promoted), or the named one is not theirs."""


@dataclass(frozen=True)
class Route:
    version: ModelVersion
    experiment_id: int | None = None
    arm: str | None = None


def bucket(user_name: str, salt: str) -> float:
    """A stable number in [0, 1) for a user: the same on every server, every restart, every Python."""
    digest = hashlib.blake2b(f"{salt}\0{user_name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def newest_in(s: Session, state: RolloutState) -> ModelVersion | None:
    return s.scalar(select(ModelVersion).where(ModelVersion.rollout_state == state)
                    .order_by(ModelVersion.promoted_at.desc(), ModelVersion.id.desc()).limit(1))


def default_route(s: Session, user: User) -> Route:
    if user.is_staff:
        staff = newest_in(s, RolloutState.staff)
        if staff is not None:
            return Route(staff)
    exp = running_experiment(s)
    if exp is not None and exp.arms:
        b, acc = bucket(user.name, exp.name), 0.0
        for arm in exp.arms:
            acc += arm.traffic_share
            if b < acc:
                return Route(arm.model_version, exp.id, arm.name)
        return Route(exp.arms[0].model_version, exp.id, exp.arms[0].name)  # float rounding: control
    everyone = current_all(s)
    if everyone is None:
        raise NoModel("no model version is serving (register one and `ownllm models promote NAME --to all`)")
    return Route(everyone)


def route(s: Session, user: User, requested: str | None) -> Route:
    """The version for this request; ``requested`` is the OpenAI ``model`` field."""
    if requested is None or requested in ROUTED_ALIASES:
        return default_route(s, user)
    mv = s.scalar(select(ModelVersion).where(ModelVersion.name == requested))
    if mv is None or mv.rollout_state == RolloutState.retired:
        raise NoModel(f"model {requested!r} does not exist or is retired")
    if user.is_staff:
        return Route(mv)
    routed = default_route(s, user)
    if mv.id == routed.version.id:
        return routed
    if mv.rollout_state == RolloutState.all:
        return Route(mv)
    raise NoModel(f"model {requested!r} is not available to this user")


def visible_versions(s: Session, user: User) -> list[ModelVersion]:
    """Versions a user may name in ``model`` (GET /v1/models)."""
    rows = list(s.scalars(select(ModelVersion).where(ModelVersion.rollout_state != RolloutState.retired)
                          .order_by(ModelVersion.id)))
    if user.is_staff:
        return rows
    try:
        mine = default_route(s, user).version.id
    except NoModel:
        mine = None
    return [v for v in rows if v.rollout_state == RolloutState.all or v.id == mine]
