"""Continue's autocomplete outcomes as feedback: ``POST /v1/events/continue``.

Continue (continuedev/continue) can point its tab-autocomplete at any OpenAI-compatible ``apiBase`` (this
gateway), and its ``data`` destinations report what happened to each suggestion. For an ``http(s)``
destination, ``core/data/log.ts`` POSTs one JSON envelope per event::

    {"name": "autocomplete", "data": <AutocompleteOutcome>, "schema": "0.2.0", "level": "all" | "noCode",
     "profileId": "..."}

with ``Authorization: Bearer <apiKey>`` when the destination has an ``apiKey`` (here: an ownllm API key).
The outcome (``packages/config-yaml/src/schemas/data/autocomplete``, schema 0.2.0) carries ``completionId,
accepted, time, prefix, suffix, prompt, completion, modelName, modelProvider, cacheHit, filepath, gitRepo,
timestamp`` (``noCode`` drops prefix, suffix, prompt and completion). Continue logs an outcome only for a
suggestion it displayed: ``accepted: true`` when taken, ``false`` once it was not taken within 10 s.

The path sits beside Tabby's ``/v1/events`` under the same prefix, so one gateway base URL serves both
editors' events. Besides the envelope the endpoint takes a bare outcome (the lines of Continue's ``file://``
destination, ``autocomplete.jsonl``), or a JSON array of either (a batch, e.g. replaying that file).
Each outcome becomes one completion row (client ``continue``, ``request_id = "continue-" + completionId``,
shown at ``timestamp``) plus its accept/reject; the same completionId again is a no-op (a contradicting
decision is a 409), and a batch is all or nothing. Events other than ``autocomplete`` are counted as ignored.
"""

import logging
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError
from sqlalchemy import select

from feedback import kept, store
from feedback.models import Completion, FeedbackEvent, FeedbackKind, User, utcnow

log = logging.getLogger("ownllm.serve.continue")

SCHEMAS = ("0.1.0", "0.2.0")
# File extensions → the pipeline's language names (Continue sends a file URI, not a language id).
EXTENSIONS = {
    ".py": "python", ".pyi": "python", ".js": "javascript", ".mjs": "javascript", ".cjs": "javascript",
    ".jsx": "javascript", ".ts": "typescript", ".tsx": "typescript", ".c": "c", ".h": "c", ".cc": "cpp",
    ".cpp": "cpp", ".cxx": "cpp", ".hpp": "cpp", ".go": "go", ".rs": "rust", ".java": "java", ".rb": "ruby",
    ".sh": "shell", ".bash": "shell", ".php": "php", ".cs": "c#", ".kt": "kotlin", ".swift": "swift",
}


class AutocompleteOutcome(BaseModel):
    """Continue's AutocompleteOutcome, schema 0.2.0 (0.1.0's extra nested options are ignored)."""

    model_config = ConfigDict(extra="ignore")

    completionId: str = Field(min_length=1, max_length=54)  # + "continue-" fits request_id's 64 characters
    accepted: StrictBool | None = None
    time: float = Field(ge=0)  # ms Continue waited for the completion
    prefix: str | None = None  # absent at level noCode
    suffix: str | None = None
    prompt: str | None = None
    completion: str | None = None
    modelName: str = Field(min_length=1, max_length=128)
    modelProvider: str | None = Field(None, max_length=64)
    cacheHit: StrictBool = False
    filepath: str = Field(max_length=1024)
    gitRepo: str | None = Field(None, max_length=1024)
    timestamp: datetime


class ContinueEnvelope(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str = Field(min_length=1, max_length=64)
    data: dict[str, Any]
    schema_: str = Field(alias="schema", max_length=16)
    level: Literal["all", "noCode"] = "all"
    profileId: str | None = Field(None, max_length=256)


def language_of(filepath: str) -> str:
    return EXTENSIONS.get(PurePosixPath(filepath.split("?", 1)[0]).suffix.lower(), "unknown")


def _naive_utc(ts: datetime) -> datetime:
    return ts.astimezone(UTC).replace(tzinfo=None) if ts.tzinfo else ts


def parse_outcomes(payload: Any, max_batch: int) -> tuple[list[tuple[AutocompleteOutcome, str]], int]:
    """The autocomplete outcomes in a POST body, each with its level; and how many other events were skipped.

    Raises ApiError (400) naming the first bad item: a batch is stored all or nothing.
    """
    from feedback.app import ApiError

    items = payload if isinstance(payload, list) else [payload]
    if not items:
        raise ApiError(400, "empty batch: send one event or a JSON array of events", param="body")
    if len(items) > max_batch:
        raise ApiError(400, f"too many events: {len(items)} > {max_batch}", param="body")
    out, skipped = [], 0
    for i, item in enumerate(items):
        where = f"event[{i}]" if isinstance(payload, list) else "event"
        if not isinstance(item, dict):
            raise ApiError(400, f"{where}: expected a JSON object, got {type(item).__name__}", param=where)
        level = "all"
        if "data" in item and "name" in item:
            try:
                env = ContinueEnvelope.model_validate(item)
            except ValidationError as exc:
                raise ApiError(400, f"{where}: {_first_error(exc)}", param=where) from None
            if env.name != "autocomplete":
                skipped += 1
                continue
            if env.schema_ not in SCHEMAS:
                raise ApiError(400, f"{where}.schema: {env.schema_!r} is not a supported schema version "
                               f"({', '.join(SCHEMAS)})", param=f"{where}.schema")
            item, level, where = env.data, env.level, f"{where}.data"
        try:
            outcome = AutocompleteOutcome.model_validate(item)
        except ValidationError as exc:
            raise ApiError(400, f"{where}: {_first_error(exc)}", param=where) from None
        out.append((outcome, level))
    return out, skipped


def _first_error(exc: ValidationError) -> str:
    e = exc.errors()[0]
    loc = ".".join(str(p) for p in e.get("loc", ())) or "body"
    return f"{loc}: {e.get('msg')}"


def store_outcomes(s, user: User, outcomes: list[tuple[AutocompleteOutcome, str]], max_prompt_chars: int,
                   derive_window_s: float) -> tuple[list[dict], list[tuple[str, str, str]]]:
    """One completion row + decision per outcome, idempotent on completionId.

    Returns the per-event results and (model, language, decision) of each decision newly stored (metrics)."""
    from feedback.app import ApiError
    from feedback.routing import NoModel, route

    me = s.get(User, user.id)
    keep_code = getattr(me, "store_code", True)
    results, batch_rows, counted = [], {}, []
    for i, (o, level) in enumerate(outcomes):
        size = sum(len(t or "") for t in (o.prefix, o.suffix))
        if size > max_prompt_chars:
            raise ApiError(400, f"event[{i}]: prefix plus suffix is {size} characters, over the limit of "
                           f"{max_prompt_chars}", param=f"event[{i}]")
        rid = f"continue-{o.completionId}"
        kind = None if o.accepted is None else (FeedbackKind.accepted if o.accepted else FeedbackKind.rejected)
        row = batch_rows.get(rid) or s.scalar(select(Completion).where(Completion.request_id == rid,
                                                                       Completion.choice_index == 0))
        if row is not None:
            if row.user_id != user.id:
                raise store.Conflict(f"event[{i}].completionId {o.completionId!r} is already used by another "
                                     f"client")
            prior = s.scalar(select(FeedbackEvent).where(FeedbackEvent.completion_id == row.id))
            if prior is not None and kind is not None and prior.kind != kind:
                raise store.Conflict(f"event[{i}]: completion {o.completionId!r} was already {prior.kind.value}, "
                                     f"cannot record {kind.value}")
            if prior is None and kind is not None:
                s.add(FeedbackEvent(completion_id=row.id, kind=kind, created_at=utcnow()))
                s.flush()
                counted.append((row.model_version.name, row.language, kind.value))
                results.append({"completionId": o.completionId, "stored": True, "decision": kind.value})
            else:
                results.append({"completionId": o.completionId, "stored": False, "duplicate": True})
            continue
        try:
            r = route(s, me, o.modelName)
        except NoModel:
            r = route(s, me, "auto")  # a name the registry does not know (Continue's own label): who served it
        shown = _naive_utc(o.timestamp)
        prefix = o.prefix
        code = keep_code and level == "all"
        row = Completion(request_id=rid, choice_index=0, user_id=me.id, end_user=None, model_version_id=r.version.id,
                         experiment_id=r.experiment_id, language=language_of(o.filepath), client="continue",
                         filepath=o.filepath, git_url=o.gitRepo, prompt=prefix if code else None,
                         suffix=o.suffix if code else None, completion=o.completion if code else None,
                         prompt_hash=store.sha256(prefix or ""),
                         suffix_hash=store.sha256(o.suffix) if o.suffix else None,
                         finish_reason="unknown", prompt_tokens=0, completion_tokens=0, latency_ms=o.time,
                         created_at=shown, viewed_at=shown)
        s.add(row)
        s.flush()
        batch_rows[rid] = row
        if kind is not None:
            s.add(FeedbackEvent(completion_id=row.id, kind=kind, created_at=utcnow()))
            s.flush()
            counted.append((r.version.name, row.language, kind.value))
        if code and prefix:
            kept.derive_from_request(s, me, o.filepath, prefix, shown, derive_window_s, exclude_request_id=rid)
        results.append({"completionId": o.completionId, "stored": True,
                        "decision": kind.value if kind else None})
    return results, counted


def build_router(user_dep) -> APIRouter:
    router = APIRouter(tags=["continue"])
    UserDep = Annotated[User, Depends(user_dep)]

    @router.post("/v1/events/continue")
    def continue_events(request: Request, user: UserDep, payload: Annotated[Any, Body()]) -> dict:
        app = request.app
        cfg, fcfg = app.state.cfg, app.state.feedback_cfg
        outcomes, skipped = parse_outcomes(payload, cfg.max_feedback_batch)
        with app.state.factory.begin() as s:
            results, counted = store_outcomes(s, user, outcomes, cfg.max_prompt_chars, fcfg.derive_window_s)
        for model, language, kind in counted:
            app.state.metrics.feedback.labels(model, language, kind).inc()
        return {"events": results, "skipped": skipped}

    return router
