"""The feedback store's schema: SQLAlchemy 2 typed models.

Designed for the queries it serves:
- the gateway authenticates by key hash, routes by rollout state, logs one row per choice served;
- analytics aggregates acceptance per (model version, language, time window) — hence the composite
  index on ``completions(model_version_id, language, created_at)``;
- RLHF snapshots prompt/suffix/completion texts joined with their accept/reject decision.

Times are naive UTC everywhere (``utcnow()``): SQLite has no time zones, and mixing aware and naive
datetimes between the two databases is a classic source of bugs.
Every schema change is an Alembic revision under ``migrations/versions/``.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (JSON, Boolean, DateTime, Enum, Float, ForeignKey, Index, Integer, MetaData, String, Text,
                        UniqueConstraint)
from sqlalchemy import true as sa_true
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Deterministic constraint names, so Alembic can drop them by name on PostgreSQL (and batch-alter on SQLite).
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSON}


class RolloutState(str, enum.Enum):
    """Where a model version is in its life: staff first, then an A/B arm, then everyone, then retired."""

    staff = "staff"
    ab = "ab"
    all = "all"
    retired = "retired"


class FeedbackKind(str, enum.Enum):
    accepted = "accepted"  # wholly or partly (FeedbackEvent.accepted_chars)
    rejected = "rejected"  # dismissed
    ignored = "ignored"  # shown, then neither accepted nor dismissed in time


class Client(str, enum.Enum):
    """Which client API a completion was asked through."""

    openai = "openai"
    tabby = "tabby"
    continue_ = "continue"
    simulated = "simulated"


class KeptSource(str, enum.Enum):
    """Where ``Completion.kept_text`` (what the user really kept at the cursor) came from."""

    typed = "typed"  # the client reported it
    derived = "derived"  # read off a later request of the same user and file
    simulated = "simulated"  # the simulated user knows the file's real continuation


class ServeStatus(str, enum.Enum):
    """A completion row is written before its first byte is sent and completed afterwards."""

    pending = "pending"
    served = "served"
    disconnected = "disconnected"
    failed = "failed"
    # Generated but not shown: the version's suggestion filter predicted a reject, so the client got nothing
    # (OpenAI: empty text; Tabby: no choice). Analytics count it as not shown.
    filtered = "filtered"


class ExperimentStatus(str, enum.Enum):
    running = "running"
    stopped = "stopped"


def _enum(e: type[enum.Enum], name: str) -> Enum:
    # Stored as VARCHAR + CHECK (native_enum=False): adding a state later is a plain migration on both databases.
    return Enum(e, name=name, native_enum=False, create_constraint=True, length=16,
                values_callable=lambda x: [m.value for m in x])


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    is_staff: Mapped[bool] = mapped_column(Boolean, default=False)
    # False: the store keeps counts, ids and hashes of this user's completions but no code text.
    store_code: Mapped[bool] = mapped_column(Boolean, default=True, server_default=sa_true())
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)

    keys: Mapped[list[ApiKey]] = relationship(back_populates="user")


class ApiKey(Base):
    """An API key, stored only as its SHA-256: keys are long random tokens, so a fast hash is enough."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))  # first characters, to tell keys apart in listings
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime)

    user: Mapped[User] = relationship(back_populates="keys")


class ModelVersion(Base):
    """The model registry: what produced a model (lineage) and who gets it (rollout state)."""

    __tablename__ = "model_versions"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    path: Mapped[str] = mapped_column(String(1024))  # HF-format model directory the local backend loads
    git_rev: Mapped[str | None] = mapped_column(String(64))
    dvc_lock_hash: Mapped[str | None] = mapped_column(String(64))
    snapshot_hash: Mapped[str | None] = mapped_column(String(64))  # feedback snapshot it was tuned on
    model_hash: Mapped[str | None] = mapped_column(String(64))  # content hash of the weights
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    eval_results: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    rollout_state: Mapped[RolloutState] = mapped_column(_enum(RolloutState, "rollout_state"),
                                                        default=RolloutState.staff, index=True)
    ab_percent: Mapped[float | None] = mapped_column(Float)  # traffic share while rollout_state == ab
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    promoted_at: Mapped[datetime | None] = mapped_column(DateTime)

    parent: Mapped[ModelVersion | None] = relationship(remote_side="ModelVersion.id")


class Completion(Base):
    """One choice served. A request with ``n`` choices is ``n`` rows sharing ``request_id``.

    Texts are nullable: the retention purge clears them after N days and keeps the row (so counts and
    acceptance rates survive), plus the hashes (so duplicates can still be recognised).
    """

    __tablename__ = "completions"
    __table_args__ = (
        UniqueConstraint("request_id", "choice_index", name="uq_completions_request_choice"),
        Index("ix_completions_version_lang_time", "model_version_id", "language", "created_at"),
        Index("ix_completions_user_time", "user_id", "created_at"),
        Index("ix_completions_created_at", "created_at"),
        Index("ix_completions_user_file_time", "user_id", "filepath", "created_at"),
        # Covering indexes for the acceptance queries of the report and the console (migration 0003): a time
        # window read from the index alone, and an A/B experiment's arms (and their users) without a scan.
        Index("ix_completions_time_version_lang_user", "created_at", "model_version_id", "language", "user_id",
              "viewed_at"),
        Index("ix_completions_experiment_version_time", "experiment_id", "model_version_id", "created_at", "user_id",
              "viewed_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    request_id: Mapped[str] = mapped_column(String(64))
    choice_index: Mapped[int] = mapped_column(Integer, default=0)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    end_user: Mapped[str | None] = mapped_column(String(256))  # the OpenAI `user` field, as sent
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    experiment_id: Mapped[int | None] = mapped_column(ForeignKey("experiments.id"))
    language: Mapped[str] = mapped_column(String(32), default="unknown")
    prompt: Mapped[str | None] = mapped_column(Text)
    suffix: Mapped[str | None] = mapped_column(Text)
    completion: Mapped[str | None] = mapped_column(Text)
    prompt_hash: Mapped[str] = mapped_column(String(64))
    suffix_hash: Mapped[str | None] = mapped_column(String(64))
    finish_reason: Mapped[str] = mapped_column(String(16))
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    latency_ms: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    texts_purged_at: Mapped[datetime | None] = mapped_column(DateTime)
    client: Mapped[str] = mapped_column(String(16), default=Client.openai.value, server_default="openai")
    filepath: Mapped[str | None] = mapped_column(String(1024))
    git_url: Mapped[str | None] = mapped_column(String(1024))
    viewed_at: Mapped[datetime | None] = mapped_column(DateTime)  # the first view event, where a client sends it
    kept_text: Mapped[str | None] = mapped_column(Text)  # what the user really kept at the cursor
    kept_source: Mapped[str | None] = mapped_column(String(16))  # a KeptSource value
    kept_at: Mapped[datetime | None] = mapped_column(DateTime)
    status: Mapped[str] = mapped_column(String(16), default=ServeStatus.served.value, server_default="served")

    user: Mapped[User] = relationship()
    model_version: Mapped[ModelVersion] = relationship()
    feedback: Mapped[FeedbackEvent | None] = relationship(back_populates="completion_row", uselist=False)


class FeedbackEvent(Base):
    """The user's decision on one completion. One per completion: a repeat of the same event is a no-op."""

    __tablename__ = "feedback_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    completion_id: Mapped[int] = mapped_column(ForeignKey("completions.id", ondelete="CASCADE"), unique=True)
    kind: Mapped[FeedbackKind] = mapped_column(_enum(FeedbackKind, "feedback_kind"))
    time_to_decision_ms: Mapped[float | None] = mapped_column(Float)
    accepted_chars: Mapped[int | None] = mapped_column(Integer)  # a partial accept; None = the whole suggestion
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)

    completion_row: Mapped[Completion] = relationship(back_populates="feedback")


class AuditEvent(Base):
    """Who did what to which target, and when: promotions and retirements (console, CLI)."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(256))
    detail: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)

    user: Mapped[User | None] = relationship()


class Bounty(Base):
    """An instruction with an accepted solution: SFT data. ``source``: user, import, derived (simulated)."""

    __tablename__ = "bounties"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    title: Mapped[str] = mapped_column(String(256))
    instruction: Mapped[str] = mapped_column(Text)
    language: Mapped[str] = mapped_column(String(32), index=True)
    solution: Mapped[str] = mapped_column(Text)
    source: Mapped[str] = mapped_column(String(32), default="user")
    content_hash: Mapped[str] = mapped_column(String(64), unique=True)  # the same bounty twice is stored once
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)


class Experiment(Base):
    """An A/B test: arms with model versions and traffic shares (summing to 1)."""

    __tablename__ = "experiments"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    status: Mapped[ExperimentStatus] = mapped_column(_enum(ExperimentStatus, "experiment_status"),
                                                     default=ExperimentStatus.running, index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    stopped_at: Mapped[datetime | None] = mapped_column(DateTime)

    arms: Mapped[list[ExperimentArm]] = relationship(back_populates="experiment", order_by="ExperimentArm.id",
                                                     cascade="all, delete-orphan")


class ExperimentArm(Base):
    __tablename__ = "experiment_arms"
    __table_args__ = (UniqueConstraint("experiment_id", "name", name="uq_experiment_arms_experiment_name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    experiment_id: Mapped[int] = mapped_column(ForeignKey("experiments.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(64))  # "control" / "treatment"
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    traffic_share: Mapped[float] = mapped_column(Float)

    experiment: Mapped[Experiment] = relationship(back_populates="arms")
    model_version: Mapped[ModelVersion] = relationship()
