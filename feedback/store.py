"""Operations on the feedback store: users and keys, the model registry and rollout, feedback, bounties, retention.

Every function takes an open :class:`~sqlalchemy.orm.Session` and leaves committing to the caller
(``with factory.begin() as s: ...``), so a caller can group several operations into one transaction.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterable

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from feedback.models import (ApiKey, AuditEvent, Bounty, Completion, Experiment, ExperimentArm, ExperimentStatus,
                             FeedbackEvent, FeedbackKind, KeptSource, ModelVersion, RolloutState, ServeStatus, User,
                             utcnow)

KEY_PREFIX = "ollm-"


class StoreError(ValueError):
    """A request the store cannot honour (unknown name, bad rollout target); the message says which input."""


class NotFound(StoreError):
    pass


class Conflict(StoreError):
    pass


class StillPending(StoreError):
    """A completion the request names is still ``pending``: its rows were written before the reply and are
    completed after it (feedback/inflight.py), possibly by another gateway process. The caller retries for a
    moment (``serve.pending_feedback_wait_s``) rather than check a partial accept against text not yet stored."""


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


# ------------------------------------------------------------------------------------------ users and keys
def get_or_create_user(s: Session, name: str, staff: bool | None = None) -> User:
    user = s.scalar(select(User).where(User.name == name))
    if user is None:
        user = User(name=name, is_staff=bool(staff))
        s.add(user)
        s.flush()
    elif staff is not None:
        user.is_staff = staff
    return user


def create_key(s: Session, user_name: str, staff: bool | None = None) -> str:
    """Create a key for the user (created if new) and return it; only its hash is stored, so show it once."""
    user = get_or_create_user(s, user_name, staff)
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    s.add(ApiKey(user_id=user.id, key_hash=sha256(key), prefix=key[:12]))
    s.flush()
    return key


def authenticate(s: Session, key: str) -> User | None:
    row = s.execute(select(User).join(ApiKey).where(ApiKey.key_hash == sha256(key), ApiKey.revoked_at.is_(None)))
    return row.scalar_one_or_none()


# ------------------------------------------------------------------------------------------ model registry
def get_version(s: Session, name: str) -> ModelVersion:
    mv = s.scalar(select(ModelVersion).where(ModelVersion.name == name))
    if mv is None:
        raise NotFound(f"unknown model version {name!r}")
    return mv


def register_model_version(s: Session, name: str, path: str, *, git_rev: str | None = None,
                           dvc_lock_hash: str | None = None, snapshot_hash: str | None = None,
                           model_hash: str | None = None, parent: str | None = None,
                           eval_results: dict[str, Any] | None = None,
                           state: RolloutState | str = RolloutState.staff,
                           suggestion_filter: dict[str, Any] | None = None,
                           filter_source: str | None = None) -> ModelVersion:
    """Add a model version to the registry (new versions start with staff unless told otherwise).

    Registering the same name again with the same weights (``model_hash``) is a no-op that returns the
    existing row; with different weights it is an error, because a version name must mean one model.

    ``suggestion_filter`` (the JSON of a fitted filter, rlhf/filter.py) is carried by the version in
    ``eval_results["suggestion_filter"]`` with its lineage (its sha256 and ``filter_source``); it is refused
    (:class:`StoreError`) unless it was fitted for the weights in ``path``.
    """
    if suggestion_filter is not None:
        from feedback.suggestion_filter import REGISTRY_KEY, FilterMismatch, SuggestionFilter

        try:
            filt = SuggestionFilter.from_json(suggestion_filter, filter_source or "suggestion filter")
            filt.check_model(path, f"model version {name!r}")
        except (FilterMismatch, ValueError) as exc:
            raise StoreError(f"cannot register {name!r} with this suggestion filter: {exc}") from None
        eval_results = {**(eval_results or {}), REGISTRY_KEY: {"filter": filt.to_json(), "sha256": filt.sha256(),
                                                               "source": filter_source}}
    existing = s.scalar(select(ModelVersion).where(ModelVersion.name == name))
    if existing is not None:
        if model_hash and existing.model_hash and model_hash != existing.model_hash:
            raise Conflict(f"model version {name!r} is already registered with other weights "
                           f"({existing.model_hash[:12]} != {model_hash[:12]}); pick a new name")
        return existing
    parent_row = get_version(s, parent) if parent else None
    mv = ModelVersion(name=name, path=str(path), git_rev=git_rev, dvc_lock_hash=dvc_lock_hash,
                      snapshot_hash=snapshot_hash, model_hash=model_hash,
                      parent_id=parent_row.id if parent_row else None, eval_results=eval_results,
                      rollout_state=RolloutState(state), promoted_at=utcnow())
    s.add(mv)
    s.flush()
    if mv.rollout_state == RolloutState.all:
        _demote_other_all(s, mv)
    return mv


def parse_target(target: str) -> tuple[RolloutState, float | None]:
    """``staff`` | ``ab:PCT`` (0 < PCT < 100) | ``all`` | ``retired`` → (state, percent)."""
    if target.startswith("ab:"):
        try:
            pct = float(target[3:])
        except ValueError:
            raise StoreError(f"bad rollout target {target!r}: expected ab:PCT with PCT a number") from None
        if not 0 < pct < 100:
            raise StoreError(f"bad rollout target {target!r}: PCT must be between 0 and 100 (exclusive)")
        return RolloutState.ab, pct
    try:
        return RolloutState(target), None
    except ValueError:
        raise StoreError(f"bad rollout target {target!r}: expected staff, ab:PCT, all or retired") from None


def promote(s: Session, name: str, target: str) -> ModelVersion:
    """Move a version to ``staff``, ``ab:PCT``, ``all`` or ``retired``.

    ``ab:PCT`` starts (or re-weights) the running A/B experiment: the version currently serving
    everyone is the control arm with (100-PCT)% of traffic, this version the treatment with PCT%.
    ``all`` makes it the version for everyone, stops any running experiment, and moves the previous
    ``all`` version back to ``staff`` (still available to staff for comparison, one command to roll back).
    """
    state, pct = parse_target(target)
    mv = get_version(s, name)
    if mv.rollout_state == RolloutState.all and state != RolloutState.all:
        # Demoting the version that serves everyone would leave users with no model (404s): roll forward
        # (promote another version --to all, which moves this one back to staff) instead.
        raise StoreError(f"{name!r} is the version serving everyone; promote another version --to all first")
    if state == RolloutState.ab:
        control = current_all(s)
        if control is None:
            raise StoreError(f"cannot A/B test {name!r}: no version is serving everyone (promote one --to all first)")
        if control.id == mv.id:
            raise StoreError(f"cannot A/B test {name!r} against itself: it already serves everyone")
        _stop_experiments(s)
        exp = Experiment(name=f"{control.name}-vs-{mv.name}-{utcnow():%Y%m%d%H%M%S%f}")
        exp.arms = [ExperimentArm(name="control", model_version_id=control.id, traffic_share=1 - pct / 100),
                    ExperimentArm(name="treatment", model_version_id=mv.id, traffic_share=pct / 100)]
        s.add(exp)
    elif state in (RolloutState.all, RolloutState.retired) or mv.rollout_state == RolloutState.ab:
        _stop_experiments(s)
    mv.rollout_state, mv.ab_percent, mv.promoted_at = state, pct, utcnow()
    if state == RolloutState.all:
        _demote_other_all(s, mv)
    s.flush()
    return mv


def retire(s: Session, name: str) -> ModelVersion:
    return promote(s, name, "retired")


def current_all(s: Session) -> ModelVersion | None:
    return s.scalar(select(ModelVersion).where(ModelVersion.rollout_state == RolloutState.all)
                    .order_by(ModelVersion.promoted_at.desc(), ModelVersion.id.desc()).limit(1))


def _demote_other_all(s: Session, mv: ModelVersion) -> None:
    s.execute(update(ModelVersion).where(ModelVersion.rollout_state == RolloutState.all, ModelVersion.id != mv.id)
              .values(rollout_state=RolloutState.staff, ab_percent=None))


def _stop_experiments(s: Session) -> None:
    for exp in s.scalars(select(Experiment).where(Experiment.status == ExperimentStatus.running)):
        exp.status, exp.stopped_at = ExperimentStatus.stopped, utcnow()
        for arm in exp.arms:  # a treatment that did not win goes back to staff
            v = s.get(ModelVersion, arm.model_version_id)
            if v is not None and v.rollout_state == RolloutState.ab:
                v.rollout_state, v.ab_percent = RolloutState.staff, None


def running_experiment(s: Session) -> Experiment | None:
    return s.scalar(select(Experiment).where(Experiment.status == ExperimentStatus.running)
                    .order_by(Experiment.id.desc()).limit(1))


def list_versions(s: Session) -> list[ModelVersion]:
    return list(s.scalars(select(ModelVersion).order_by(ModelVersion.id)))


def rollout_label(v: ModelVersion) -> str:
    """``staff`` | ``ab:PCT`` | ``all`` | ``retired``: a version's state in the syntax of a rollout target."""
    if v.rollout_state == RolloutState.ab and v.ab_percent is not None:
        return f"ab:{v.ab_percent:g}"
    return v.rollout_state.value


def promote_audited(s: Session, name: str, target: str, user: User | None, via: str, **detail: Any) -> tuple[str, str]:
    """:func:`promote` plus an audit row (who, what, from → to, through which tool); returns (before, after)."""
    before = rollout_label(get_version(s, name))
    after = rollout_label(promote(s, name, target))
    s.add(AuditEvent(user_id=user.id if user else None, action="retire" if target == "retired" else "promote",
                     target=name, detail={"from": before, "to": after, "via": via, **detail}, created_at=utcnow()))
    s.flush()
    return before, after


# --------------------------------------------------------------------------------------------- feedback
@dataclass(frozen=True)
class FeedbackInput:
    request_id: str
    kind: FeedbackKind
    index: int = 0
    time_to_decision_ms: float | None = None
    accepted_chars: int | None = None  # a partial accept: characters of the suggestion taken (None = all)
    kept_text: str | None = None  # what the user really kept at the cursor
    kept_source: KeptSource | str | None = None  # typed | derived | simulated (default typed)


@dataclass(frozen=True)
class FeedbackResult:
    request_id: str
    index: int
    kind: str
    duplicate: bool
    model: str = ""
    language: str = ""


def record_feedback(s: Session, user: User, events: Iterable[FeedbackInput],
                    defer_pending: bool = False) -> list[FeedbackResult]:
    """Store accept/reject decisions for the user's own completions, idempotently.

    All or nothing: an unknown (or someone else's) completion raises :class:`NotFound`, a decision that
    contradicts the stored one raises :class:`Conflict`, and the caller's transaction rolls back.
    The same event twice is stored once (one decision per completion, enforced by a unique key).
    ``defer_pending``: a completion still ``pending`` raises :class:`StillPending` (retry); otherwise its text
    counts as unknown.
    """
    out = record_feedback_many(s, [(user, list(events))], [defer_pending])[0]
    if isinstance(out, StoreError):
        raise out
    return out


def record_feedback_many(s: Session, requests: list[tuple[User, list[FeedbackInput]]],
                         defer_pending: list[bool] | None = None) -> list[list[FeedbackResult] | StoreError]:
    """:func:`record_feedback` for many requests in one transaction, with a constant number of queries.

    The gateway's group commit (feedback/ingest.py) writes every request that arrived while the previous
    commit ran through this. Each request is still all or nothing: a request with an unknown completion or a
    contradicting decision gets its :class:`StoreError` in its slot of the result and adds nothing; the others
    are stored. Requests are decided in order, as if each had its own transaction: a later request that
    contradicts an earlier one's decision in the same group is a :class:`Conflict`, a repeat is a duplicate.

    A request whose ``defer_pending`` flag is set and that names a completion still ``pending`` (its rows not
    completed yet, by this or another gateway process) gets :class:`StillPending` and adds nothing, to be
    retried; without the flag a pending completion's text counts as unknown (as for a user storing no code).
    """
    wanted = {e.request_id for _, events in requests for e in events}
    if not wanted:
        return [[] for _ in requests]
    rows = s.execute(select(Completion.id, Completion.user_id, Completion.request_id, Completion.choice_index,
                            Completion.language, ModelVersion.name, Completion.completion, Completion.status)
                     .join(ModelVersion).where(Completion.request_id.in_(wanted))).all()
    ids = {(r.user_id, r.request_id, r.choice_index): r.id for r in rows}
    labels = {r.id: (r.name, r.language) for r in rows}
    pending = {r.id for r in rows if r.status == ServeStatus.pending.value}
    texts = {r.id: None if r.id in pending else r.completion for r in rows}
    defer = defer_pending or [False] * len(requests)
    decided: dict[int, FeedbackKind] = {r.completion_id: r.kind for r in s.execute(
        select(FeedbackEvent.completion_id, FeedbackEvent.kind).where(FeedbackEvent.completion_id.in_(ids.values())))}
    results: list[list[FeedbackResult] | StoreError] = []
    new: list[dict] = []
    kept: dict[int, tuple[str, KeptSource]] = {}
    for (user, events), wait in zip(requests, defer):
        try:
            res, mine_new, mine_kept = _decide(user, events, ids, labels, texts, decided, pending if wait else set())
        except StoreError as exc:
            results.append(exc)
            continue
        results.append(res)
        new += mine_new
        kept.update(mine_kept)
        decided.update({row["completion_id"]: row["kind"] for row in mine_new})
    if new:
        _insert_ignoring_duplicates(s, new)
    now = utcnow()
    for cid, (text, source) in kept.items():  # the latest report of what was kept wins
        s.execute(update(Completion).where(Completion.id == cid)
                  .values(kept_text=text, kept_source=source.value, kept_at=now))
    return results


def _decide(user: User, events: list[FeedbackInput], ids: dict, labels: dict, texts: dict,
            decided: dict[int, FeedbackKind], defer: set[int]) -> tuple[list[FeedbackResult], list[dict], dict]:
    """One request's events checked against what is stored (and decided earlier in the group); raises
    :class:`StoreError` without side effects (:class:`StillPending` when it names a completion in ``defer``)."""
    keys = {(e.request_id, e.index) for e in events}
    missing = sorted(k for k in keys if (user.id, *k) not in ids)
    if missing:
        rid, idx = missing[0]
        raise NotFound(f"no completion {rid!r} (choice {idx}) for this user")
    waiting = sorted(k for k in keys if ids[(user.id, *k)] in defer)
    if waiting:
        raise StillPending(f"completion {waiting[0][0]!r} is still being logged (status pending); try again")
    out, new, seen, kept = [], [], {}, {}
    for e in events:
        cid = ids[(user.id, e.request_id, e.index)]
        prior = decided.get(cid, seen.get(cid))
        if prior is not None and prior != e.kind:
            raise Conflict(f"completion {e.request_id!r} (choice {e.index}) was already {prior.value}, "
                           f"cannot record {e.kind.value}")
        if e.accepted_chars is not None:
            if e.kind != FeedbackKind.accepted:
                raise StoreError(f"completion {e.request_id!r} (choice {e.index}): accepted_chars needs event 'accepted'")
            text = texts[cid]
            if text is not None and e.accepted_chars > len(text):
                raise StoreError(f"completion {e.request_id!r} (choice {e.index}): accepted_chars={e.accepted_chars} "
                                 f"exceeds the suggestion's {len(text)} characters")
        if e.kept_text is not None:
            try:
                kept[cid] = (e.kept_text, KeptSource(e.kept_source or KeptSource.typed))
            except ValueError:
                raise StoreError(f"kept_source must be one of {[k.value for k in KeptSource]}, "
                                 f"not {e.kept_source!r}") from None
        if prior is None:
            seen[cid] = e.kind
            new.append({"completion_id": cid, "kind": e.kind, "time_to_decision_ms": e.time_to_decision_ms,
                        "accepted_chars": e.accepted_chars, "created_at": utcnow()})
        out.append(FeedbackResult(e.request_id, e.index, e.kind.value, prior is not None, *labels[cid]))
    return out, new, kept


def _insert_ignoring_duplicates(s: Session, rows: list[dict]) -> None:
    """Bulk insert; a concurrent identical event (same completion) is skipped by the unique key, not an error."""
    dialect = s.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:  # pragma: no cover - other databases: plain insert, the unique key still protects the data
        from sqlalchemy import insert
        s.execute(insert(FeedbackEvent), rows)
        return
    s.execute(insert(FeedbackEvent).on_conflict_do_nothing(index_elements=["completion_id"]), rows)


# --------------------------------------------------------------------------------------------- bounties
def bounty_hash(title: str, instruction: str, language: str, solution: str) -> str:
    return sha256("\0".join((title, instruction, language, solution)))


def add_bounty(s: Session, *, title: str, instruction: str, language: str, solution: str, source: str = "user",
               user: User | None = None) -> tuple[Bounty, bool]:
    """Add a bounty; the same content twice is stored once. Returns (row, created)."""
    h = bounty_hash(title, instruction, language, solution)
    row = s.scalar(select(Bounty).where(Bounty.content_hash == h))
    if row is not None:
        return row, False
    row = Bounty(title=title, instruction=instruction, language=language, solution=solution, source=source,
                 user_id=user.id if user else None, content_hash=h)
    s.add(row)
    s.flush()
    return row, True


# -------------------------------------------------------------------------------------------- retention
def purge_texts(s: Session, older_than_days: int) -> int:
    """Clear prompt/suffix/completion/kept texts older than N days; rows, hashes and feedback stay (counts survive)."""
    if older_than_days < 0:
        raise StoreError(f"retention days must be >= 0, got {older_than_days}")
    cutoff = utcnow() - timedelta(days=older_than_days)
    res = s.execute(update(Completion)
                    .where(Completion.created_at < cutoff, Completion.texts_purged_at.is_(None))
                    .values(prompt=None, suffix=None, completion=None, kept_text=None, texts_purged_at=utcnow()))
    return res.rowcount or 0


def counts(s: Session) -> dict[str, int]:
    """Row counts per table (reports, tests, the load test's nothing-lost check)."""
    out = {}
    for name, model in (("users", User), ("completions", Completion), ("feedback_events", FeedbackEvent),
                        ("bounties", Bounty), ("model_versions", ModelVersion), ("experiments", Experiment)):
        out[name] = s.scalar(select(func.count()).select_from(model)) or 0
    return out
