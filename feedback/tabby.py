"""The Tabby server API in the gateway: every Tabby IDE extension (through ``tabby-agent``) becomes a client.

Tabby's extensions for VS Code, JetBrains, Vim/Neovim and Emacs, and any LSP editor running
``tabby-agent --lsp --stdio``, talk to their server through tabby-agent, which calls (read from
tabby-agent 1.5.0's source, ``clients/tabby-agent/src/TabbyAgent.ts`` in TabbyML/tabby):
- ``GET /v1/health`` (``POST`` when GET is a 405) — a 401/403 turns the agent to "unauthorized";
- ``GET /v1beta/server_setting`` — fetched after a health answer with ``model`` and ``device`` whose
  ``version.git_describe`` is at least 0.9.0;
- ``POST /v1/completions`` with ``{language, segments: {prefix, suffix, filepath, git_url, declarations,
  relevant_snippets_from_changed_files, clipboard}, user}`` → ``{id, choices: [{index, text}]}``;
- ``POST /v1/events`` with ``{type: view|select|dismiss, completion_id, choice_index, view_id, elapsed}`` and
  ``?select_kind=line`` for a line-only (partial) accept; any other type is a 400, as on Tabby's server.

The completion shape shares ``/v1/completions`` with the OpenAI shape (feedback/app.py tells them apart by
``segments``); both become one :class:`~feedback.requests.CompletionInput` served by the gateway's
``CompletionService`` (same FIM prompt builder, routing, A/B arms and logging). Events are stored as feedback
on the user's *own* completions only: ``view`` sets ``completions.viewed_at`` (the first time), ``select`` is
an accept (``select_kind=line``: ``accepted_chars`` = the characters up to the end of the next line; VS Code's
extension also sends "line" for accept-next-word, so it is an upper bound), and ``dismiss`` a reject;
``elapsed`` (ms since shown) is the time to decision. A completion accepted at any showing stays accepted
(:func:`record_event`).
"""

import logging
import os
import platform
import re
from datetime import timedelta
from importlib.metadata import PackageNotFoundError, version
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from feedback import kept, store
from feedback.inflight import until_settled
from feedback.models import Completion, FeedbackEvent, FeedbackKind, ServeStatus, User, utcnow
from feedback.backends import Sampling
from feedback.requests import CompletionInput

log = logging.getLogger("ownllm.serve.tabby")

# tabby-agent reads ``version.git_describe`` as the Tabby server release to decide which endpoints exist
# (server_setting needs >= 0.9.0). The answer is the Tabby API level this module implements: that of Tabby
# v0.11, the server release tabby-agent 1.5.0 shipped with, tagged with ownllm's own version.
TABBY_API_LEVEL = "v0.11.0"

# VS Code language identifiers (what Tabby's clients send) → the language names of the data pipeline.
LANGUAGE_ALIASES = {
    "javascriptreact": "javascript", "typescriptreact": "typescript", "shellscript": "shell", "bash": "shell",
    "sh": "shell", "c++": "cpp", "py": "python", "js": "javascript", "ts": "typescript", "plaintext": "unknown",
}
_LANGUAGE_NAME = re.compile(r"^[a-z0-9_+#.-]{1,32}$")


def our_language(editor_language: str | None) -> str:
    """Map an editor's language id to ours; anything unnamed or not a plain identifier is ``unknown``."""
    if not editor_language:
        return "unknown"
    lang = editor_language.strip().lower()
    lang = LANGUAGE_ALIASES.get(lang, lang)
    return lang if _LANGUAGE_NAME.match(lang) else "unknown"


def ownllm_version() -> str:
    try:
        return version("ownllm")
    except PackageNotFoundError:  # running from a source tree that was never pip-installed
        return "0+unknown"


# ------------------------------------------------------------------------------------------------- shapes
class TabbySnippet(BaseModel):
    model_config = ConfigDict(extra="ignore")

    filepath: str = Field(max_length=1024)
    body: str
    score: float | None = None


class TabbySegments(BaseModel):
    """What the editor sends around the cursor. Declarations, snippets and the clipboard are accepted (the
    agent sends them) but not put in the prompt: the FIM prompt is built from prefix and suffix only, the same
    as on the OpenAI path, so both shapes give the model the same input for the same cursor."""

    model_config = ConfigDict(extra="ignore")

    prefix: str
    suffix: str | None = None
    filepath: str | None = Field(None, max_length=1024)
    git_url: str | None = Field(None, max_length=1024)
    declarations: list[TabbySnippet] | None = Field(None, max_length=64)
    relevant_snippets_from_changed_files: list[TabbySnippet] | None = Field(None, max_length=64)
    clipboard: str | None = None


class TabbyCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    language: str | None = Field(None, max_length=64)
    segments: TabbySegments
    user: str | None = Field(None, max_length=256)
    temperature: float | None = Field(None, ge=0, le=2)
    seed: int | None = Field(None, ge=0)
    debug_options: dict[str, Any] | None = None


class TabbyEvent(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["view", "select", "dismiss"]
    completion_id: str = Field(min_length=1, max_length=64)
    choice_index: int = Field(0, ge=0)
    view_id: str | None = Field(None, max_length=128)
    elapsed: int | None = Field(None, ge=0)  # ms since the completion was shown
    # tabby-agent also puts the query parameter in the body; as on Tabby's server, only "line" is partial.
    select_kind: str | None = Field(None, max_length=16)


# ---------------------------------------------------------------------------------------------- serving
def tabby_input(body: TabbyCompletionRequest, cfg) -> CompletionInput:
    """``segments`` → the one request type; ``cfg`` is the ``feedback`` params section (editor defaults)."""
    from feedback.app import ApiError

    if body.debug_options and body.debug_options.get("raw_prompt"):
        raise ApiError(400, "debug_options.raw_prompt is not supported: send segments.prefix/suffix",
                       param="debug_options")
    seg = body.segments
    return CompletionInput(prefix=seg.prefix, suffix=seg.suffix or None, model="auto",
                           language=our_language(body.language), client="tabby", end_user=body.user,
                           filepath=seg.filepath or None, git_url=seg.git_url or None,
                           sampling=Sampling(max_tokens=cfg.tabby_max_tokens,
                                             temperature=cfg.tabby_temperature if body.temperature is None
                                             else body.temperature,
                                             seed=cfg.tabby_seed if body.seed is None else body.seed))


async def complete(request: Request, body: TabbyCompletionRequest, user: User, key: str | None = None) -> dict:
    """Serve a Tabby-shaped request (which first settles what the user kept at earlier cursors of the file);
    ``key``, the user's API key, lets the routing come from the gateway's lookup cache."""
    app = request.app
    inp = tabby_input(body, app.state.feedback_cfg)
    if inp.filepath:
        await run_in_threadpool(kept.settle_from_request, app.state, inp, user)
    out = await app.state.service.acomplete(inp, user, key)
    # A choice the suggestion filter hid is not there at all: Tabby's "nothing" is an empty choices list.
    return {"id": out["id"], "choices": [{"index": c["index"], "text": c["text"]} for c in out["choices"]
                                         if not c.get("filtered")]}


# ------------------------------------------------------------------------------------------------- events
def _accepted_chars(text: str | None, before: int | None) -> int | None:
    """Characters accepted after one more line-only accept: up to and including the next newline."""
    if text is None:
        return None
    start = before or 0
    nl = text.find("\n", start)
    return len(text) if nl < 0 else nl + 1


def record_event(s, user: User, ev: TabbyEvent, select_kind: str | None, defer_pending: bool = False) -> dict:
    """Store one Tabby event on the user's own completion; someone else's is indistinguishable from none.

    Tabby's events are per showing (``view_id``), the store keeps one decision per completion, and a
    completion the user took at any showing is accepted: Tabby's VS Code extension dismisses the shown
    completion whenever it asks for the next one, shows a cached completion again (same id) after a dismiss,
    and dismisses the rest of a partly accepted one. So a select after a dismiss turns the decision into an
    accept, and a dismiss after a select leaves the accept as it is (both are 200s, not conflicts).
    ``defer_pending``: a completion still ``pending`` (being completed after its reply) raises
    :class:`store.StillPending`, for the caller to retry, since a line accept is measured on its text.
    """
    row = s.scalar(select(Completion).where(Completion.request_id == ev.completion_id,
                                            Completion.choice_index == ev.choice_index,
                                            Completion.user_id == user.id))
    if row is None:
        raise store.NotFound(f"no completion {ev.completion_id!r} (choice {ev.choice_index}) for this user")
    if defer_pending and row.status == ServeStatus.pending.value:
        raise store.StillPending(f"completion {ev.completion_id!r} is still being logged")
    now = utcnow()
    shown_at = now - timedelta(milliseconds=ev.elapsed) if ev.elapsed is not None else now
    if row.viewed_at is None:
        row.viewed_at = now if ev.type == "view" else shown_at
    out = {"completion_id": ev.completion_id, "choice_index": ev.choice_index, "type": ev.type, "duplicate": True}
    if ev.type == "view":
        return {**out, "duplicate": False}
    kind = FeedbackKind.accepted if ev.type == "select" else FeedbackKind.rejected
    line_only = ev.type == "select" and (select_kind or ev.select_kind) == "line"
    elapsed = float(ev.elapsed) if ev.elapsed is not None else None
    prior = s.scalar(select(FeedbackEvent).where(FeedbackEvent.completion_id == row.id))
    if prior is None:
        prior = FeedbackEvent(completion_id=row.id, kind=kind, time_to_decision_ms=elapsed, created_at=now,
                              accepted_chars=_accepted_chars(row.completion, 0) if line_only else None)
        s.add(prior)
    elif kind == FeedbackKind.rejected:
        return out  # a repeat, or the rest of an accepted completion dismissed: the accept stands
    elif prior.kind != FeedbackKind.accepted:  # shown again (the agent's cache) and taken this time
        prior.kind, prior.time_to_decision_ms, prior.created_at = kind, elapsed, now
        prior.accepted_chars = _accepted_chars(row.completion, 0) if line_only else None
    else:
        if line_only and prior.accepted_chars is not None:  # the next line of a partly accepted completion
            prior.accepted_chars = _accepted_chars(row.completion, prior.accepted_chars)
        elif not line_only:
            prior.accepted_chars = None  # the rest was accepted too: the whole completion
        return out
    if line_only and prior.accepted_chars is None and row.completion is None:
        prior.accepted_chars = 0  # texts not stored for this user: a partial accept whose size is unknown
    s.flush()
    return {**out, "duplicate": False, "model": row.model_version.name, "language": row.language,
            "kind": kind.value}


# ------------------------------------------------------------------------------------------------- routes
def build_router(user_dep) -> APIRouter:
    router = APIRouter(tags=["tabby"])
    UserDep = Annotated[User, Depends(user_dep)]

    def health_state(request: Request, user: User) -> dict:
        from feedback.routing import NoModel, route

        cfg = request.app.state.cfg
        with request.app.state.factory() as s:
            try:
                model = route(s, user, "auto").version.name
            except NoModel:
                model = None
        return {"model": model, "chat_model": None, "device": cfg.device if cfg.backend == "local" else "upstream",
                "arch": platform.machine(), "cpu_info": platform.processor() or platform.machine(),
                "cpu_count": os.cpu_count() or 1, "cuda_devices": [],
                "version": {"build_date": "", "build_timestamp": "", "git_sha": "",
                            "git_describe": f"{TABBY_API_LEVEL}-ownllm-{ownllm_version()}"}}

    @router.get("/v1/health")
    def health(request: Request, user: UserDep) -> dict:
        return health_state(request, user)

    @router.post("/v1/health")
    def health_post(request: Request, user: UserDep) -> dict:
        return health_state(request, user)

    @router.get("/v1beta/server_setting")
    def server_setting(user: UserDep) -> dict:
        # Completions and feedback stay on this server: the agent's own anonymous usage reports (to Tabby's
        # servers) are switched off, as Tabby's server can ask.
        return {"disable_client_side_telemetry": True}

    @router.post("/v1/events")
    def events(request: Request, body: TabbyEvent, user: UserDep,
               select_kind: Annotated[str | None, Query(max_length=16)] = None) -> dict:
        app = request.app
        metrics, wait_s = app.state.metrics, app.state.cfg.pending_feedback_wait_s
        # The completion may still be being completed after its reply (feedback/inflight.py): in this process,
        # wait for it; in another (--workers N), its row is pending and the event is retried for a moment.
        app.state.service.inflight.wait([body.completion_id], timeout=wait_s)

        def attempt(defer_pending: bool) -> dict:
            with app.state.factory.begin() as s:
                return record_event(s, user, body, select_kind, defer_pending)

        out = until_settled(attempt, wait_s)
        if not out["duplicate"] and "kind" in out:
            metrics.feedback.labels(out.pop("model"), out.pop("language"), out.pop("kind")).inc()
        return {k: out[k] for k in ("completion_id", "choice_index", "type", "duplicate")}

    return router
