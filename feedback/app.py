"""The completion gateway: an OpenAI-compatible ``/v1/completions`` that logs every completion it serves.

The gateway owns auth (Bearer keys, stored hashed), routing (rollout state, A/B arms), logging to the
feedback store, metrics and input limits; generation is a backend (feedback/backends.py).

Failure rules:
- bad input is a 4xx with an OpenAI-style ``{"error": {"message": ...}}`` body that names the input;
- the store unreachable is a 503, and a completion is returned only after its log rows are committed (as
  ``pending``; completed after the reply, feedback/inflight.py), so nothing is served unlogged; feedback is
  answered only after the transaction holding it committed (one per request, or one per group of waiting
  requests: feedback/ingest.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import socket
import os
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC
from typing import Annotated, Any, Iterator, Literal, Union

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
import anyio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, TypeAdapter, ValidationError, model_validator
from sqlalchemy import bindparam, select
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from feedback import continue_events, kept, store, suggestion_filter, tabby
from feedback.backends import (Backend, BackendError, BadGenerationRequest, Generation, GenRequest, LocalBackend,
                               Sampling, StreamDelta, UpstreamBackend)
from feedback.db import check_at_head, current_revision, make_engine
from feedback.inflight import InFlightCompletions, LookupCache, until_settled
from feedback.ingest import GroupCommitWriter, UnknownKey
from feedback.models import Completion, FeedbackKind, KeptSource, ModelVersion, ServeStatus, User, utcnow
from feedback.requests import CompletionInput
from feedback.suggestion_filter import SuggestionFilter
from feedback.routing import NoModel, Route, route, visible_versions
from feedback.config import FeedbackConfig, ServeConfig

log = logging.getLogger("ownllm.serve")
DB_ERRORS = (OperationalError, DBAPIError, PoolTimeout)


# ------------------------------------------------------------------------------------------------ errors
class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param


def error_body(message: str, type_: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": None}}


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errs = exc.errors()
    first = errs[0] if errs else {}
    if first.get("type") == "json_invalid":
        return f"malformed JSON body: {first.get('ctx', {}).get('error', 'cannot parse')}", None
    parts, param = [], None
    for e in errs[:5]:
        loc = [str(p) for p in e.get("loc", ()) if p != "body"]
        if loc and loc[0] in REQUEST_SHAPES:  # the union's tag (which shape was parsed) is not a field
            loc = loc[1:]
        name = ".".join(loc) or "body"
        param = param or name
        parts.append(f"{name}: {e.get('msg')}")
    return "invalid request: " + "; ".join(parts), param


# ---------------------------------------------------------------------------------------- request models
class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=128)
    prompt: str | list[str]
    suffix: str | None = None
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False
    user: str | None = Field(None, max_length=256)
    seed: int | None = None
    logprobs: int | None = None
    echo: bool = False
    # Not in the OpenAI schema: the editor's language of the file, for acceptance-by-language analytics.
    language: str | None = Field(None, min_length=1, max_length=32, pattern=r"^[A-Za-z0-9_+#.-]+$")
    # Nor this: the file's path, as Tabby's segments.filepath (kept_text is derived per user and file).
    filepath: str | None = Field(None, min_length=1, max_length=1024)


REQUEST_SHAPES = ("openai", "tabby")


def request_shape(body: Any) -> str:
    """OpenAI's and Tabby's completion shapes share /v1/completions; Tabby's is the one with ``segments``."""
    return "tabby" if isinstance(body, dict) and "segments" in body else "openai"


AnyCompletionRequest = Annotated[Union[Annotated[CompletionRequest, Tag("openai")],
                                       Annotated[tabby.TabbyCompletionRequest, Tag("tabby")]],
                                 Discriminator(request_shape)]
COMPLETION_REQUEST = TypeAdapter(AnyCompletionRequest)


def _document_completion_body(app: FastAPI) -> None:
    """/openapi.json documents /v1/completions' body (its endpoint parses the body itself, so FastAPI cannot)."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            doc = generate()
            body = COMPLETION_REQUEST.json_schema(ref_template="#/components/schemas/{model}")
            doc.setdefault("components", {}).setdefault("schemas", {}).update(body.pop("$defs", {}))
            doc["paths"]["/v1/completions"]["post"]["requestBody"] = {
                "required": True, "content": {"application/json": {"schema": body}}}
        return app.openapi_schema

    app.openapi = openapi


class FeedbackItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=64)
    index: int = Field(0, ge=0)
    event: FeedbackKind
    time_to_decision_ms: float | None = Field(None, ge=0)
    # A partial accept (accept word / accept line): characters of the suggestion the user took; absent = all.
    accepted_chars: int | None = Field(None, ge=0)
    # What the user really kept at the cursor (e.g. to the end of the line), and who says so.
    kept_text: str | None = Field(None, max_length=20000)
    kept_source: KeptSource | None = None

    @model_validator(mode="after")
    def _consistent(self):
        if self.accepted_chars is not None and self.event != FeedbackKind.accepted:
            raise ValueError("accepted_chars is only meaningful with event 'accepted'")
        if self.kept_source is not None and self.kept_text is None:
            raise ValueError("kept_source needs kept_text")
        return self


class FeedbackBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    events: list[FeedbackItem] = Field(min_length=1)


class BountyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    title: str = Field(min_length=1, max_length=256)
    instruction: str = Field(min_length=1, max_length=20_000)
    language: str = Field(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9_+#.-]+$")
    solution: str = Field(min_length=1, max_length=50_000)
    source: Literal["user", "import", "derived"] = "user"


# ------------------------------------------------------------------------------------------------ metrics
class Metrics:
    """Prometheus series; a registry per app so several gateways (tests) can live in one process."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.latency = Histogram("ownllm_completion_latency_seconds", "completion latency (generation + logging)",
                                 ["model", "language"], registry=self.registry,
                                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.completions = Counter("ownllm_completions", "choices served", ["model", "language"],
                                   registry=self.registry)
        self.feedback = Counter("ownllm_feedback", "feedback events stored", ["model", "language", "event"],
                                registry=self.registry)
        self.errors = Counter("ownllm_http_errors", "error responses", ["status"], registry=self.registry)
        # The autoscaler's signal (deploy/): completions being generated or streamed by this process now.
        self.inflight = Gauge("ownllm_inflight_completions", "completions in progress (generating or streaming)",
                              registry=self.registry)
        self.filtered = Counter("ownllm_filtered_completions", "choices the suggestion filter hid",
                                ["model", "language"], registry=self.registry)
        self.unlogged = Counter("ownllm_completion_log_failures", "completion rows the store could not complete "
                                "(they stay 'pending' until a retry marks them)", registry=self.registry)


# ------------------------------------------------------------------------------------------------ backends
class BackendPool:
    """One backend per model version, created on first use (loading a model takes seconds).

    Each version loads under its own lock, so a model that is loading never blocks requests to the
    versions already loaded (nor another version's load).
    """

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.cache: dict[str, Backend] = {}
        self.lock = threading.Lock()  # guards the two dicts only, never held while loading
        self.loading: dict[str, threading.Lock] = {}

    def upstream_of(self, version: ModelVersion):
        """The version's own upstream (serve.upstreams), else the default one when backend is openai."""
        from feedback.config import UpstreamConfig

        own = self.cfg.upstreams.get(version.name)
        if own is not None:
            return own
        if self.cfg.backend == "openai":
            if not self.cfg.upstream_url:
                raise BackendError("serve.backend is 'openai' but serve.upstream_url is not set")
            return UpstreamConfig(url=self.cfg.upstream_url, fim=self.cfg.upstream_fim)
        return None

    def get(self, version: ModelVersion) -> Backend:
        key = version.path if self.upstream_of(version) is None else f"upstream:{version.name}"
        backend = self.cache.get(key)
        if backend is not None:
            return backend
        with self.lock:
            load_lock = self.loading.setdefault(key, threading.Lock())
        with load_lock:
            if key not in self.cache:
                self.cache[key] = self.create(version)
            return self.cache[key]

    def create(self, version: ModelVersion) -> Backend:
        cfg = self.cfg
        up = self.upstream_of(version)
        if up is not None:
            key = os.environ.get(up.api_key_env or cfg.upstream_api_key_env)
            return UpstreamBackend(up.url, up.model or version.name, key, fim=up.fim)
        if cfg.backend == "local":
            from feedback.engine import CT2Backend, has_ct2

            if cfg.engine == "ctranslate2" and has_ct2(version.path):
                return CT2Backend(version.path, cfg.quantization, cfg.engine_threads, cfg.batch_wait_ms,
                                  cfg.max_batch, device=cfg.device)
            if cfg.engine == "ctranslate2":
                log.warning("model version %s has no CTranslate2 conversion in %s/ct2: serving it with "
                            "transformers", version.name, version.path)
            return LocalBackend(version.path, device=cfg.device, num_threads=cfg.num_threads)
        raise BackendError(f"unknown serve.backend {cfg.backend!r}")


# --------------------------------------------------------------------------------------------- body limit
class BodyLimit:
    """Pure ASGI middleware: a body over ``limit`` bytes is a 413 before anyone parses it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._reject(send)
        chunks, size, more = [], 0, True
        while more:  # read the whole (small) body, counting, then replay it
            msg = await receive()
            if msg["type"] != "http.request":
                return await self.app(scope, receive, send)
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            more = msg.get("more_body", False)
            if size > self.limit:
                return await self._reject(send)
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _reject(self, send):
        payload = json.dumps(error_body(f"request body larger than {self.limit} bytes", "invalid_request_error")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise ApiError(401, "missing API key: send `Authorization: Bearer <key>`", "authentication_error")
    return key.strip()


async def bearer_key(request: Request) -> str:
    """The request's API key (not yet checked against the store); async, so no worker-thread hop."""
    return _bearer(request)


def current_user(request: Request) -> User:
    """The user behind the Bearer key (keys are looked up by hash)."""
    return user_of_key(request, _bearer(request))


def user_of_key(request: Request, key: str) -> User:
    with request.app.state.factory() as s:
        return _authenticated(s, key)


def _authenticated(s: Session, key: str) -> User:
    user = store.authenticate(s, key)
    if user is None:
        raise ApiError(401, "invalid API key", "authentication_error")
    return user


UserDep = Annotated[User, Depends(current_user)]
KeyDep = Annotated[str, Depends(bearer_key)]


# ------------------------------------------------------------------------------------------------ the app
SERVE_CONFIG_ENV = "OWNLLM_SERVE_PARAMS"  # the parameters as JSON, for each `ownllm serve --workers N` process
APP_FACTORY = "feedback.app:app_from_env"


def app_from_env() -> FastAPI:
    """The app of one ``ownllm serve`` worker process (uvicorn calls this, ``factory=True``)."""
    from feedback.config import FeedbackParams
    from pipeline.config import params_schema

    raw = os.environ.get(SERVE_CONFIG_ENV)
    if not raw:
        raise RuntimeError(f"${SERVE_CONFIG_ENV} is not set: start the gateway with `ownllm serve`")
    params = params_schema(FeedbackParams).model_validate_json(raw)
    return create_app(params.serve, params=params)


def create_app(cfg: ServeConfig, backends: BackendPool | None = None, check_schema: bool = True,
               params=None) -> FastAPI:
    """Build the gateway. Raises StoreNotAtHead at once (not on first request) if the store needs migrating.

    ``params`` (a feedback.config.FeedbackParams) tells the console where the reports are, and the editor APIs their
    ``feedback`` settings; default: the defaults."""
    engine = make_engine(cfg.db_url, sqlite_busy_timeout_s=cfg.sqlite_busy_timeout_s)
    if check_schema:
        check_at_head(engine)
    factory: sessionmaker[Session] = sessionmaker(engine, expire_on_commit=False)
    pool = backends or BackendPool(cfg)
    metrics = Metrics()
    app = FastAPI(title="ownllm completion gateway", version="1")
    app.state.engine, app.state.factory, app.state.backends, app.state.metrics = engine, factory, pool, metrics
    service = app.state.service = CompletionService(cfg, factory, pool, metrics)
    app.state.cfg = cfg
    app.state.feedback_cfg = params.feedback if params is not None else FeedbackConfig()
    app.add_middleware(BodyLimit, limit=cfg.max_body_bytes)
    _install_error_handlers(app, metrics)

    # Health, metrics and feedback never wait behind generation: generation runs in the engine's own thread
    # (CTranslate2's batcher) or the service's generation pool, never in AnyIO's thread pool, which is left to
    # the short store queries of every endpoint.
    @app.get("/healthz")
    async def healthz() -> dict:
        rev = await run_in_threadpool(current_revision, engine)  # a DB error here is a 503 like everywhere else
        return {"status": "ok", "db_revision": rev, "backend": cfg.backend, "pid": os.getpid()}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    def models(user: UserDep) -> dict:
        with factory() as s:
            rows = visible_versions(s, user)
        data = [{"id": "auto", "object": "model", "created": 0, "owned_by": "ownllm"}]
        data += [{"id": v.name, "object": "model", "created": int(v.created_at.replace(tzinfo=UTC).timestamp()),
                  "owned_by": "ownllm", "rollout_state": v.rollout_state.value} for v in rows]
        return {"object": "list", "data": data}

    # The hot path: the body is parsed and validated by pydantic-core straight from its bytes (one pass, no
    # FastAPI dependency solving nor a json.loads before validation); the schema is still documented, and a bad
    # body is the same 400 as everywhere (RequestValidationError). docs/BENCHMARKS.md, "gateway overhead".
    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> Response:
        key = _bearer(request)
        try:
            body = COMPLETION_REQUEST.validate_json(await request.body())
        except ValidationError as exc:
            raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
                                         ) from None
        if isinstance(body, tabby.TabbyCompletionRequest):
            return await tabby.complete(request, body, await service.user_of_key(key), key)
        inp = openai_input(body, cfg)
        if inp.filepath or inp.stream:
            user = await service.user_of_key(key)
            if inp.filepath:  # feedback/kept.py: what the user kept at earlier cursors of this file, derived
                await run_in_threadpool(kept.settle_from_request, app.state, inp, user)
            if inp.stream:
                return await service.astream(inp, user)
            out = await service.acomplete(inp, user, key)
        else:  # the common case: the key is checked in the same worker-thread hop and session as the routing
            out = await service.acomplete(inp, key=key)
        # A JSONResponse of plain JSON types: FastAPI's jsonable_encoder walk of the dict is not needed.
        return JSONResponse({"id": out["id"], "object": "text_completion", "created": out["created"],
                             "model": out["model"],
                             "choices": [{"text": c["text"], "index": c["index"], "logprobs": None,
                                          "finish_reason": c["finish_reason"]} for c in out["choices"]],
                             "usage": out["usage"]})

    @app.get("/v1/completions/{request_id}")
    def get_completion(request_id: str, user: UserDep) -> dict:
        """A user's own completion (texts, decision); anyone else's is indistinguishable from a missing one.
        One still being completed (after its reply, in this or another process) is waited for a moment."""
        service.inflight.wait([request_id], timeout=cfg.pending_feedback_wait_s)
        return until_settled(lambda defer: _completion_of(request_id, user, defer), cfg.pending_feedback_wait_s)

    def _completion_of(request_id: str, user: User, defer_pending: bool) -> dict:
        with factory() as s:
            rows = s.scalars(select(Completion).where(Completion.request_id == request_id,
                                                      Completion.user_id == user.id)
                             .order_by(Completion.choice_index)).all()
            if not rows:
                raise ApiError(404, f"no completion {request_id!r}", "invalid_request_error", "id")
            if defer_pending and any(r.status == ServeStatus.pending.value for r in rows):
                raise store.StillPending(f"completion {request_id!r} is still being logged")
            return {"id": request_id, "model": rows[0].model_version.name, "language": rows[0].language,
                    "prompt": rows[0].prompt, "suffix": rows[0].suffix,
                    "choices": [{"index": c.choice_index, "text": c.completion, "finish_reason": c.finish_reason,
                                 "feedback": c.feedback.kind.value if c.feedback else None} for c in rows]}

    writer = app.state.feedback_writer = GroupCommitWriter(factory, pending_wait_s=cfg.pending_feedback_wait_s)

    @app.post("/v1/feedback")
    async def feedback(body: FeedbackItem | FeedbackBatch, key: KeyDep) -> dict:
        """Stored by the group commit (feedback/ingest.py): answered after the commit that holds its events;
        the key is checked in the same transaction."""
        items = body.events if isinstance(body, FeedbackBatch) else [body]
        if len(items) > cfg.max_feedback_batch:
            raise ApiError(400, f"too many events: {len(items)} > {cfg.max_feedback_batch}", param="events")
        events = [store.FeedbackInput(i.id, i.event, i.index, i.time_to_decision_ms, i.accepted_chars, i.kept_text,
                                      i.kept_source) for i in items]
        # A completion this process is still completing (its reply went out first): wait for its rows, so a
        # partial accept is checked against the stored text. Another process's shows as pending (retried).
        await service.inflight.await_settled([e.request_id for e in events], timeout=cfg.pending_feedback_wait_s)
        if cfg.feedback_group_commit:
            try:
                results = await asyncio.wrap_future(writer.submit(key, events))
            except UnknownKey:
                raise ApiError(401, "invalid API key", "authentication_error") from None
        else:
            results = await run_in_threadpool(_feedback_alone, key, events)
        for res in results:
            if not res.duplicate:
                metrics.feedback.labels(res.model, res.language, res.kind).inc()
        out = [{"id": r.request_id, "index": r.index, "event": r.kind, "duplicate": r.duplicate} for r in results]
        return {"events": out} if isinstance(body, FeedbackBatch) else out[0]

    def _feedback_alone(key: str, events: list[store.FeedbackInput]) -> list[store.FeedbackResult]:
        def attempt(defer_pending: bool) -> list[store.FeedbackResult]:
            with factory.begin() as s:  # one transaction per request (serve.feedback_group_commit false)
                user = store.authenticate(s, key)
                if user is None:
                    raise ApiError(401, "invalid API key", "authentication_error")
                return store.record_feedback(s, user, events, defer_pending)

        return until_settled(attempt, cfg.pending_feedback_wait_s)

    @app.post("/v1/bounties", status_code=201)
    def bounties(body: BountyRequest, user: UserDep) -> dict:
        with factory.begin() as s:
            row, created = store.add_bounty(s, title=body.title, instruction=body.instruction,
                                            language=body.language, solution=body.solution, source=body.source,
                                            user=user)
        return {"id": row.id, "created": created}

    from feedback.console import mount_console

    mount_console(app, params)  # the web console under /console (feedback/console/)
    _document_completion_body(app)
    app.include_router(tabby.build_router(current_user))  # /v1/health, /v1/events, /v1beta/server_setting
    app.include_router(continue_events.build_router(current_user))  # /v1/events/continue
    return app


def openai_input(body: CompletionRequest, cfg: ServeConfig) -> CompletionInput:
    """The OpenAI request shape as the one request type; OpenAI-only limits (a prompt list, logprobs, echo)."""
    if isinstance(body.prompt, list):
        if len(body.prompt) != 1:
            raise ApiError(400, "prompt: only one prompt per request is supported (got a list of "
                           f"{len(body.prompt)})", param="prompt")
        prompt = body.prompt[0]
    else:
        prompt = body.prompt
    if body.logprobs is not None or body.echo:
        raise ApiError(400, "logprobs and echo are not supported by this gateway", param="logprobs")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return CompletionInput(prefix=prompt, suffix=body.suffix or None, model=body.model,
                           language=body.language or "unknown", client="openai", end_user=body.user,
                           filepath=body.filepath, stream=body.stream,
                           sampling=Sampling(max_tokens=body.max_tokens, temperature=body.temperature,
                                             top_p=body.top_p, n=body.n, stop=tuple(stops), seed=body.seed))


def gen_request(inp: CompletionInput, cfg: ServeConfig) -> GenRequest:
    """Limits that depend on configuration (so not in any client's pydantic model); each error names its field."""
    if len(inp.prefix) + len(inp.suffix or "") > cfg.max_prompt_chars:
        raise ApiError(400, f"prompt: prompt plus suffix is {len(inp.prefix) + len(inp.suffix or '')} characters, "
                       f"over the limit of {cfg.max_prompt_chars}", param="prompt")
    sp = inp.sampling
    if sp.max_tokens > cfg.max_tokens_limit:
        raise ApiError(400, f"max_tokens: {sp.max_tokens} is over the limit of {cfg.max_tokens_limit}",
                       param="max_tokens")
    if sp.n > cfg.max_n:
        raise ApiError(400, f"n: {sp.n} is over the limit of {cfg.max_n}", param="n")
    if len(sp.stop) > cfg.max_stop or any(len(s) > 64 or not s for s in sp.stop):
        raise ApiError(400, f"stop: at most {cfg.max_stop} non-empty sequences of up to 64 characters",
                       param="stop")
    return GenRequest.of(inp.prefix, inp.suffix, sp)


class CompletionService:
    """Every client API's completions: validate limits, route (rollout, A/B), generate, log, count.

    Client shapes (OpenAI here, Tabby in feedback/tabby.py) build a :class:`CompletionInput` and call
    :meth:`acomplete` / :meth:`astream` from an ``async def`` endpoint (:meth:`complete` / :meth:`stream`
    from sync code); the result is client-neutral (``id``, ``model``, ``created``, ``choices`` with
    ``index``/``text``/``finish_reason``, ``usage``) for the caller to shape.

    Nothing is served unlogged: every completion gets its rows (status ``pending``) committed before its first
    byte is sent. A non-streamed one on the batched engine is completed (``served``/``filtered``) right after
    its reply, in :attr:`inflight` (readers of its text wait for that commit); one generated in the service's
    pool is logged in one transaction before its reply. A streamed one is completed after its last byte as
    ``served``, ``disconnected`` (the client left, or the request was cancelled) or ``failed`` (the backend
    or the store failed; a row the store could not complete is retried in the background).
    """

    def __init__(self, cfg: ServeConfig, factory: sessionmaker[Session], pool: BackendPool, metrics: Metrics):
        self.cfg, self.factory, self.pool, self.metrics = cfg, factory, pool, metrics
        self.engine = factory.kw["bind"]  # completion rows are written with Core statements (completion_rows)
        # Backends without a batcher of their own (transformers, upstream HTTP) generate here, and streamed
        # deltas are pulled here; neither ever occupies AnyIO's pool.
        self.generate_pool = ThreadPoolExecutor(cfg.max_concurrent_generations, thread_name_prefix="ownllm-generate")
        self.filters: dict[tuple[str, str], SuggestionFilter | None] = {}  # per (version, path), checked once
        # feedback/inflight.py: lookups reused for serve.lookup_cache_s; rows completed after the reply.
        self.lookups = LookupCache(cfg.lookup_cache_s)
        self.inflight = InFlightCompletions()

    async def user_of_key(self, key: str) -> User:
        """The key's user: from the lookup cache, else from the store (in a worker thread)."""
        user = self.lookups.get(("user", key))
        if user is None:
            user = await run_in_threadpool(self._user_of_key, key)
        return user

    def _user_of_key(self, key: str) -> User:
        with self.factory() as s:
            user = _authenticated(s, key)
        self.lookups.put(("user", key), user)
        return user

    def _route(self, inp: CompletionInput, user: User) -> Route:
        with self.factory() as s:
            try:
                return route(s, user, inp.model)
            except NoModel as exc:
                raise ApiError(404, str(exc), "invalid_request_error", "model") from None

    def _backend(self, inp: CompletionInput, user: User) -> tuple[Route, Backend]:
        r = self._route(inp, user)
        return r, self.pool.get(r.version)

    def _log(self, rid: str, inp: CompletionInput, gen: GenRequest, r: Route, user: User, out: Generation,
             latency: float, hidden: list[bool] | None = None) -> None:
        # A hidden choice's text is kept (what the filter hid); its status says nobody saw it.
        statuses = [(ServeStatus.filtered if h else ServeStatus.served).value
                    for h in (hidden or [False] * len(out.choices))]
        self._insert(completion_rows(rid, inp, gen, r, user, [(c.text, c.finish_reason, c.completion_tokens)
                                                              for c in out.choices], out.prompt_tokens, latency,
                                     statuses))

    def _insert(self, rows: list[dict]) -> None:
        with self.engine.begin() as conn:
            conn.execute(INSERT_COMPLETIONS, rows)

    # -- suggestion filter ---------------------------------------------------------------------------
    def _filter(self, r: Route) -> SuggestionFilter | None:
        """The routed version's suggestion filter when ``serve.suggestion_filter`` is on (None: show all).

        Loaded once per version and checked against the weights it serves: a filter fitted for other weights
        is refused (a 503 naming the version), never applied. Upstream versions have no log-probabilities
        here, so they are never filtered."""
        if not self.cfg.suggestion_filter or self.pool.upstream_of(r.version) is not None:
            return None
        key = (r.version.name, r.version.path)
        if key not in self.filters:
            try:
                self.filters[key] = suggestion_filter.of_version(r.version)
            except (suggestion_filter.FilterMismatch, ValueError) as exc:
                raise BackendError(f"model version {r.version.name!r}: {exc}") from None
        return self.filters[key]

    def _hidden(self, filt: SuggestionFilter | None, inp: CompletionInput, out: Generation) -> list[bool]:
        """Per choice: hidden by the filter (an empty suggestion is nothing already, never 'filtered')."""
        if filt is None:
            return [False] * len(out.choices)
        return [bool(c.text) and not filt.show(suggestion_filter.filter_input(inp.prefix, c.text, c.logprob or 0.0,
                                                                              inp.language))
                for c in out.choices]

    def _result(self, rid: str, r: Route, inp: CompletionInput, out: Generation, latency: float,
                hidden: list[bool] | None = None) -> dict:
        hidden = hidden or [False] * len(out.choices)
        self.metrics.latency.labels(r.version.name, inp.language).observe(latency)
        self.metrics.completions.labels(r.version.name, inp.language).inc(len(out.choices) - sum(hidden))
        if any(hidden):
            self.metrics.filtered.labels(r.version.name, inp.language).inc(sum(hidden))
        n_comp = sum(c.completion_tokens for c in out.choices)
        # A hidden choice is "nothing": empty text (the OpenAI shape keeps its index), ``filtered`` for shapes
        # that drop it (Tabby returns no choice).
        return {"id": rid, "created": int(time.time()), "model": r.version.name,
                "choices": [{"index": i, "text": "" if h else c.text, "finish_reason": c.finish_reason,
                             "filtered": h} for i, (c, h) in enumerate(zip(out.choices, hidden))],
                "usage": {"prompt_tokens": out.prompt_tokens, "completion_tokens": n_comp,
                          "total_tokens": out.prompt_tokens + n_comp}}

    def complete(self, inp: CompletionInput, user: User) -> dict:
        gen = gen_request(inp, self.cfg)
        r, backend = self._backend(inp, user)
        filt = self._filter(r)
        if filt is not None:
            gen = dataclasses.replace(gen, logprobs=True)
        rid = f"cmpl-{uuid.uuid4().hex}"
        t0 = time.perf_counter()
        with _counting(self.metrics.inflight):
            out = backend.complete(gen)
        hidden = self._hidden(filt, inp, out)
        latency = time.perf_counter() - t0
        self._log(rid, inp, gen, r, user, out, latency, hidden)
        return self._result(rid, r, inp, out, latency, hidden)

    def _prepare(self, inp: CompletionInput, user: User | None, key: str | None
                 ) -> tuple[User, Route, Backend, SuggestionFilter | None]:
        """The key's user (when not known yet), route, backend and filter in one worker-thread hop and one
        session (each hop and session costs ~1 ms on a busy box: docs/BENCHMARKS.md); a model load and the
        filter's first use, which hashes the version's weights, wait here, off the loop."""
        with self.factory() as s:
            if user is None:
                user = _authenticated(s, key)
            try:
                r = route(s, user, inp.model)
            except NoModel as exc:
                raise ApiError(404, str(exc), "invalid_request_error", "model") from None
        prepared = user, r, self.pool.get(r.version), self._filter(r)
        if key is not None:  # only lookups that succeeded are reused (an unknown key asks the store every time)
            self.lookups.put(("user", key), user)
            self.lookups.put(("route", key, inp.model), prepared)
        return prepared

    async def acomplete(self, inp: CompletionInput, user: User | None = None, key: str | None = None) -> dict:
        """``user``, or ``key`` to look the user up in the same hop as the routing (or in the lookup cache,
        with no hop at all)."""
        gen = gen_request(inp, self.cfg)
        prepared = self.lookups.get(("route", key, inp.model)) if key is not None else None
        if prepared is None:
            prepared = await run_in_threadpool(self._prepare, inp, user, key)
        user, r, backend, filt = prepared
        return await self._acomplete_routed(inp, user, gen, r, backend, filt)

    async def _acomplete_routed(self, inp: CompletionInput, user: User, gen: GenRequest, r: Route, backend: Backend,
                                filt: SuggestionFilter | None) -> dict:
        if filt is not None:
            gen = dataclasses.replace(gen, logprobs=True)
        rid = f"cmpl-{uuid.uuid4().hex}"
        t0 = time.perf_counter()
        submit = getattr(backend, "complete_future", None)  # the CTranslate2 engine: its batcher resolves it
        fut = submit(gen) if submit is not None else None  # a prompt the model cannot take is a 400 here
        if fut is None:  # generation in the service's pool: generate, then log (one transaction)
            with _counting(self.metrics.inflight):
                out = await asyncio.wrap_future(self.generate_pool.submit(backend.complete, gen))
            hidden = self._hidden(filt, inp, out)
            latency = time.perf_counter() - t0
            await run_in_threadpool(self._log, rid, inp, gen, r, user, out, latency, hidden)
            return self._result(rid, r, inp, out, latency, hidden)
        # The engine decodes in its own thread while the rows are written as 'pending' (the store's latency
        # hides behind decoding's); they are completed after the response (below).
        with _counting(self.metrics.inflight):
            try:
                await run_in_threadpool(self._write_pending, rid, inp, gen, r, user, 0)
            except BaseException:
                fut.cancel()  # nothing was recorded, so nothing is served (a store error: 503)
                raise
            try:
                out = await asyncio.wrap_future(fut)
            except BaseException as exc:
                status = (ServeStatus.failed if isinstance(exc, Exception) else ServeStatus.disconnected).value
                with anyio.CancelScope(shield=True):  # the rows say what happened, also when cancelled
                    try:
                        await run_in_threadpool(self._complete_rows, rid, user, [("", "", 0)] * gen.n, 0,
                                                time.perf_counter() - t0, status)
                    except DB_ERRORS as db_exc:
                        log.error("completion %s stays 'pending': %s", rid, db_exc)
                raise
        hidden = self._hidden(filt, inp, out)
        latency = time.perf_counter() - t0
        statuses = [(ServeStatus.filtered if h else ServeStatus.served).value for h in hidden]
        # The rows are committed (pending) already; completing them waits for no one: the reply goes out now
        # and the request id stays in flight until that commit (readers of its text wait: feedback/inflight.py).
        self.inflight.submit(rid, user.id, self._complete_after_reply, rid, user,
                             [(c.text, c.finish_reason, c.completion_tokens) for c in out.choices],
                             out.prompt_tokens, latency, statuses)
        return self._result(rid, r, inp, out, latency, hidden)

    def stream(self, inp: CompletionInput, user: User) -> StreamingResponse:
        """:meth:`astream` for a sync endpoint (it runs in an AnyIO worker thread, as FastAPI runs them)."""
        return anyio.from_thread.run(self.astream, inp, user)

    async def astream(self, inp: CompletionInput, user: User) -> StreamingResponse:
        gen = gen_request(inp, self.cfg)
        _, r, backend, filt = await run_in_threadpool(self._prepare, inp, user, None)
        if filt is not None:
            # The filter needs the whole suggestion (its mean log-probability) before anything may be shown:
            # generate, decide and log first, then send each choice as one chunk (a hidden one as empty text).
            out = await self._acomplete_routed(inp, user, gen, r, backend, filt)
            return StreamingResponse(self._decided_events(out), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        rid = f"cmpl-{uuid.uuid4().hex}"
        stream = await run_in_threadpool(backend.stream, gen)  # validates the prompt: a bad one is still a 400
        # Written before the first byte: if this fails, the client gets a 503 and nothing was served.
        await run_in_threadpool(self._write_pending, rid, inp, gen, r, user, stream.prompt_tokens)
        return LoggedStream(self._events(rid, inp, gen, r, user, stream), media_type="text/event-stream",
                            headers={"Cache-Control": "no-cache"})

    @staticmethod
    async def _decided_events(out: dict):
        for c in out["choices"]:
            yield _sse({"id": out["id"], "object": "text_completion", "created": out["created"], "model": out["model"],
                        "choices": [{"text": c["text"], "index": c["index"], "logprobs": None,
                                     "finish_reason": c["finish_reason"]}]})
        yield "data: [DONE]\n\n"

    def _write_pending(self, rid, inp, gen, r, user, prompt_tokens: int) -> None:
        self._insert(completion_rows(rid, inp, gen, r, user, [("", "", 0)] * gen.n, prompt_tokens, 0.0,
                                     ServeStatus.pending.value))

    def _complete_rows(self, rid: str, user: User, choices: list[tuple[str, str, int]], prompt_tokens: int,
                       latency: float, status: str | list[str]) -> None:
        """Complete the request's pending rows; ``status`` is every choice's, or one per choice."""
        keep = user.store_code is not False
        statuses = _per_choice(status, len(choices))
        with self.engine.begin() as conn:
            conn.execute(COMPLETE_COMPLETIONS, [
                {"rid": rid, "idx": i, "text": text if keep else None, "finish": finish, "n_tok": n_tok,
                 "p_tok": prompt_tokens, "ms": latency * 1000, "st": st}
                for i, ((text, finish, n_tok), st) in enumerate(zip(choices, statuses))])

    def _complete_after_reply(self, *args) -> None:
        """:meth:`_complete_rows` once the reply was sent; a store error is retried in the background (the row
        stays ``pending`` meanwhile: served text the store has not recorded as served yet)."""
        try:
            self._complete_rows(*args)
        except DB_ERRORS as exc:
            log.error("could not complete the log of completion %s: %s", args[0], exc)
            self.metrics.unlogged.inc()
            self._retry_complete_rows(*args)

    def _retry_complete_rows(self, *args) -> None:
        """The store failed as a completion ended: keep trying (in the background) to record what was sent
        (a stream as ``failed``), so a transient outage still ends with a row that says what happened."""
        def retry():
            for wait in (0.5, 1, 2, 4, 8, 15, 30):
                time.sleep(wait)
                try:
                    self._complete_rows(*args)
                    return
                except DB_ERRORS:
                    continue
            log.error("completion %s stays 'pending': the store did not come back", args[0])

        threading.Thread(target=retry, name="ownllm-log-retry", daemon=True).start()

    async def _events(self, rid, inp, gen, r, user, stream):
        t0 = time.perf_counter()
        texts: dict[int, list[str]] = {i: [] for i in range(gen.n)}
        finals: dict[int, StreamDelta] = {}
        created = int(time.time())
        deltas = iter(stream.deltas)
        pending: Future | None = None
        status = ServeStatus.disconnected.value  # until the stream ends: a cancel or a dropped client
        error: dict | None = None
        end = object()

        def choices() -> list[tuple[str, str, int]]:
            return [("".join(texts[i]), finals[i].finish_reason if i in finals else "length",
                     finals[i].completion_tokens if i in finals else 0) for i in sorted(texts)]

        async def record(status: str) -> bool:
            args = (rid, user, choices(), stream.prompt_tokens, time.perf_counter() - t0, status)
            with anyio.CancelScope(shield=True):  # runs even when the request was cancelled
                try:
                    await run_in_threadpool(self._complete_rows, *args)
                    return True
                except DB_ERRORS as exc:
                    log.error("could not complete the log of streamed completion %s: %s", rid, exc)
                    self.metrics.unlogged.inc()
                    self._retry_complete_rows(*args[:-1], ServeStatus.failed.value)
                    return False

        self.metrics.inflight.inc()
        try:
            try:
                while True:
                    pending = self.generate_pool.submit(next, deltas, end)
                    d = await asyncio.wrap_future(pending)
                    pending = None
                    if d is end:
                        break
                    texts.setdefault(d.index, []).append(d.text)
                    if d.finish_reason:
                        finals[d.index] = d
                    yield _sse({"id": rid, "object": "text_completion", "created": created, "model": r.version.name,
                                "choices": [{"text": d.text, "index": d.index, "logprobs": None,
                                             "finish_reason": d.finish_reason}]})
                status = ServeStatus.served.value
            except BackendError as exc:
                status, error = ServeStatus.failed.value, error_body(str(exc), "backend_error")
                self.metrics.errors.labels("502").inc()
            except Exception:
                status = ServeStatus.failed.value
                raise
            logged = await record(status)
            if error is not None:
                yield _sse(error)
                return
            if not logged:
                self.metrics.errors.labels("503").inc()
                yield _sse(error_body("feedback store unavailable; this completion could not be logged as served",
                                      "store_unavailable"))
                return
            self.metrics.latency.labels(r.version.name, inp.language).observe(time.perf_counter() - t0)
            self.metrics.completions.labels(r.version.name, inp.language).inc(len(texts))
            yield "data: [DONE]\n\n"
        finally:
            self.metrics.inflight.dec()
            if status != ServeStatus.served.value and error is None:
                # The client left mid-stream (or something unexpected broke): stop generating, say so in the row.
                self._close_later(deltas, pending)
                await record(status)

    def _close_later(self, deltas, pending: Future | None) -> None:
        """Close the backend's delta iterator (which cancels its generation) once no thread is inside it."""
        def close():
            if pending is not None:
                try:
                    pending.result()
                except BaseException:  # noqa: BLE001 - only waiting for the thread to leave the iterator
                    pass
            close_it = getattr(deltas, "close", None)
            if close_it is not None:
                close_it()

        self.generate_pool.submit(close)


class LoggedStream(StreamingResponse):
    """A StreamingResponse that always closes its body iterator, so the stream's ``finally`` (completing the
    log rows as ``disconnected``, cancelling generation) runs as soon as the client is gone, not when the
    iterator happens to be garbage-collected (Starlette only stops iterating when a send fails)."""

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()


@contextmanager
def _counting(gauge: Gauge) -> Iterator[None]:
    gauge.inc()
    try:
        yield
    finally:
        gauge.dec()


def _per_choice(status: str | list[str], n: int) -> list[str]:
    return [status] * n if isinstance(status, str) else status


def completion_rows(rid: str, inp: CompletionInput, gen: GenRequest, r: Route, user: User,
                    choices: list[tuple[str, str, int]], prompt_tokens: int, latency_s: float,
                    status: str | list[str]) -> list[dict]:
    """One row (the ``completions`` table's column values) per choice, with ``status`` (every choice's, or one
    per choice); a user who opted out of code storage (``store_code`` false) gets hashes only. Plain values for
    one Core ``INSERT`` (:data:`INSERT_COMPLETIONS`): cheaper than the ORM's unit of work on the path that runs
    beside decoding (docs/BENCHMARKS.md, "Serving, fourth pass", store phases)."""
    p_hash, s_hash = store.sha256(gen.prompt), store.sha256(gen.suffix) if gen.suffix else None
    keep = user.store_code is not False
    now = utcnow()
    return [{"request_id": rid, "choice_index": i, "user_id": user.id, "end_user": inp.end_user,
             "model_version_id": r.version.id, "experiment_id": r.experiment_id, "language": inp.language,
             "prompt": gen.prompt if keep else None, "suffix": gen.suffix if keep else None,
             "completion": text if keep else None, "prompt_hash": p_hash, "suffix_hash": s_hash,
             "finish_reason": finish, "prompt_tokens": prompt_tokens, "completion_tokens": n_tok,
             "latency_ms": latency_s * 1000, "created_at": now, "client": inp.client, "filepath": inp.filepath,
             "git_url": inp.git_url, "status": st}
            for i, ((text, finish, n_tok), st) in enumerate(zip(choices, _per_choice(status, len(choices))))]


COMPLETIONS = Completion.__table__
INSERT_COMPLETIONS = COMPLETIONS.insert()
# One statement for every choice of a request (executemany): compiled once, cached by SQLAlchemy.
COMPLETE_COMPLETIONS = (COMPLETIONS.update()
                        .where(COMPLETIONS.c.request_id == bindparam("rid"),
                               COMPLETIONS.c.choice_index == bindparam("idx"))
                        .values(completion=bindparam("text"), finish_reason=bindparam("finish"),
                                completion_tokens=bindparam("n_tok"), prompt_tokens=bindparam("p_tok"),
                                latency_ms=bindparam("ms"), status=bindparam("st")))


def _sse(payload: Any) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _install_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    def reply(status: int, message: str, type_: str, param: str | None = None, headers=None) -> JSONResponse:
        metrics.errors.labels(str(status)).inc()
        return JSONResponse(error_body(message, type_, param), status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api(_req, exc: ApiError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return reply(exc.status, exc.message, exc.type, exc.param, headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return reply(400, message, "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req, exc: StarletteHTTPException):
        return reply(exc.status_code, str(exc.detail), "invalid_request_error")

    @app.exception_handler(store.NotFound)
    async def _not_found(_req, exc):
        return reply(404, str(exc), "invalid_request_error", "id")

    @app.exception_handler(store.Conflict)
    async def _conflict(_req, exc):
        return reply(409, str(exc), "conflict", "event")

    @app.exception_handler(store.StoreError)
    async def _store(_req, exc):
        return reply(400, str(exc), "invalid_request_error")

    @app.exception_handler(BadGenerationRequest)
    async def _bad_gen(_req, exc):
        return reply(400, str(exc), "invalid_request_error", "max_tokens")

    @app.exception_handler(BackendError)
    async def _backend(_req, exc):
        return reply(502, str(exc), "backend_error")

    for exc_type in DB_ERRORS:
        @app.exception_handler(exc_type)
        async def _db(_req, exc):
            log.error("feedback store unavailable: %s", exc)
            return reply(503, "feedback store unavailable, try again later (nothing was recorded)",
                         "store_unavailable", headers={"Retry-After": "5"})

    @app.exception_handler(Exception)
    async def _other(_req, exc):  # never a bare 500 page: still JSON, and logged with its traceback
        log.exception("unhandled error")
        return reply(500, f"internal error: {type(exc).__name__}", "server_error")


@contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run the gateway under uvicorn in a background thread (simulator, benchmarks); yields its base URL.

    ``port=0`` takes a free port. Real HTTP over a real socket: exactly what an IDE plugin talks to.
    """
    import uvicorn

    if port == 0:
        with socket.socket() as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off",
                                           timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, name="ownllm-gateway", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"the gateway did not start on {host}:{port}")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        service = getattr(app.state, "service", None)
        if service is not None:  # rows completed after their replies are in the store once this returns
            service.inflight.drain()
