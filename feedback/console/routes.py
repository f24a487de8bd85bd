"""The console's pages and its one action (rollout), as a FastAPI router mounted under ``/console``.

Pages are rendered on the server (Jinja2); charts are drawn in the browser by uPlot from numbers embedded
in the page, so a page without JavaScript still shows every number in its tables.

Who may do what: every valid key may read the model-level pages (versions and their lineage, A/B
verdicts, the loop, training, data), which say nothing about any one user; the Overview shows staff every
user's completions and anyone else only their own. Only staff keys may change a rollout: the server
answers 403 to anyone else, whatever the page showed.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Depends, FastAPI, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlalchemy import select

from feedback import store
from feedback.console import reports, views
from feedback.console.auth import (COOKIE, ConsoleError, LoginRequired, Viewer, check_csrf, require_staff,
                                   viewer)
from feedback.models import AuditEvent, User, utcnow

HERE = Path(__file__).resolve().parent
PREFIX = "/console"
PAGES = [("overview", "Overview", ""), ("versions", "Versions", "/versions"), ("ab", "A/B", "/ab"),
         ("loop", "Loop", "/loop"), ("training", "Training", "/training"), ("data", "Data", "/data")]
ROLLOUT_TARGETS = ("staff", "ab", "all", "retired")
AUDIT_ROWS = 20

templates = Jinja2Templates(directory=str(HERE / "templates"))
ViewerDep = Annotated[Viewer, Depends(viewer)]


def _fmt_rate(v) -> str:
    return "–" if v is None else f"{v:.3f}"


def _fmt_num(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _percentiles(dist: dict) -> list[tuple[str, str]]:
    """A stats.json distribution ({p50, p90, p99, max}, keys sorted by the writer) as p-order then max,
    values over 100 without decimals (bytes, lengths) and fractions with two."""
    keys = sorted((k for k in dist if k.startswith("p")), key=lambda k: float(k[1:])) + \
        [k for k in dist if not k.startswith("p")]
    return [(k, f"{dist[k]:,.0f}" if abs(dist[k]) >= 100 else f"{dist[k]:.2f}") for k in keys]


templates.env.filters["rate"] = _fmt_rate
templates.env.filters["percentiles"] = _percentiles
templates.env.filters["num"] = _fmt_num
templates.env.filters["short"] = lambda v, n=12: "–" if not v else str(v)[:n]


def _page(request: Request, template: str, v: Viewer | None, page: str, status: int = 200, **ctx) -> HTMLResponse:
    return templates.TemplateResponse(request, template, {"viewer": v, "page": page, "pages": PAGES,
                                                          "prefix": PREFIX, **ctx}, status_code=status)


def build_router(params=None) -> APIRouter:
    from feedback.config import FeedbackConfig
    from pipeline.config import StatsConfig

    paths = reports.ReportPaths.from_params(params)
    fb = params.feedback if params else FeedbackConfig()
    funnel_order = list((params.data.stats if params else StatsConfig()).funnel)  # raw → clean → dedup
    router = APIRouter(prefix=PREFIX, include_in_schema=False)

    # ---------------------------------------------------------------------------------------- sign in/out
    @router.get("/login")
    def login_form(request: Request, next: str = PREFIX) -> HTMLResponse:
        return _page(request, "login.html", None, "login", next=_safe_next(next))

    @router.post("/login")
    def login(request: Request, key: Annotated[str, Form(max_length=256)] = "",
              next: Annotated[str, Form(max_length=512)] = PREFIX) -> Response:
        key = key.strip()
        with request.app.state.factory() as s:
            user = store.authenticate(s, key) if key else None
        if user is None:
            return _page(request, "login.html", None, "login", status=401, next=_safe_next(next),
                         error="that key is not valid (missing, mistyped or revoked)")
        resp = RedirectResponse(_safe_next(next), status_code=303)
        resp.set_cookie(COOKIE, key, httponly=True, samesite="strict", path=PREFIX,
                        secure=request.url.scheme == "https")
        return resp

    @router.post("/logout")
    def logout() -> Response:
        resp = RedirectResponse(f"{PREFIX}/login", status_code=303)
        resp.delete_cookie(COOKIE, path=PREFIX)
        return resp

    # ---------------------------------------------------------------------------------------------- pages
    @router.get("")
    @router.get("/")
    def overview(request: Request, v: ViewerDep) -> HTMLResponse:
        with request.app.state.factory() as s:
            ctx = views.overview(s, v.user, utcnow(), fb.ignored_after_s)
        return _page(request, "overview.html", v, "overview", **ctx)

    @router.get("/versions")
    def versions(request: Request, v: ViewerDep, done: str | None = None) -> HTMLResponse:
        with request.app.state.factory() as s:
            rows = views.versions(s)
            audit = _audit_rows(s) if v.is_staff else []
        return _page(request, "versions.html", v, "versions", versions=rows, audit=audit, done=done,
                     targets=ROLLOUT_TARGETS)

    @router.get("/versions/{name}/rollout")
    def confirm_rollout(request: Request, v: ViewerDep, name: str, to: str = "", pct: float | None = None) -> HTMLResponse:
        require_staff(v, "changing a rollout")
        target = _target(to, pct)
        with request.app.state.factory() as s:
            mv = _version(s, name)
            current = store.rollout_label(mv)
            control = store.current_all(s)
        return _page(request, "confirm.html", v, "versions", name=name, current=current, target=target,
                     control=control.name if control else None)

    @router.post("/versions/{name}/rollout")
    def rollout(request: Request, v: ViewerDep, name: str, to: Annotated[str, Form(max_length=32)] = "",
                confirm: Annotated[str, Form(max_length=8)] = "",
                csrf: Annotated[str | None, Form(max_length=128)] = None) -> Response:
        require_staff(v, "changing a rollout")
        check_csrf(v, csrf)
        target = _target(to, None)
        if confirm != "yes":
            raise ConsoleError(400, "confirm: the rollout form must be confirmed (confirm=yes)")
        with request.app.state.factory.begin() as s:
            _version(s, name)
            try:
                before, after = store.promote_audited(s, name, target, v.user, "console")
            except store.StoreError as exc:
                raise ConsoleError(400, str(exc)) from None
        request.app.state.service.lookups.clear()  # this process routes by the new rollout at once
        return RedirectResponse(f"{PREFIX}/versions?done={quote(f'{name}: {before} → {after}')}", status_code=303)

    @router.get("/ab")
    def ab(request: Request, v: ViewerDep) -> HTMLResponse:
        since = utcnow() - timedelta(days=fb.report_days)
        with request.app.state.factory() as s:
            exps = views.experiments(s, since, fb.ab_alpha, fb.ab_power, fb.ignored_after_s)
        return _page(request, "ab.html", v, "ab", experiments=exps, days=fb.report_days, alpha=fb.ab_alpha,
                     power=fb.ab_power)

    @router.get("/loop")
    def loop(request: Request, v: ViewerDep) -> HTMLResponse:
        loaded = reports.load_json(paths.loop)
        rounds = reports.loop_rounds(loaded.data) if isinstance(loaded.data, dict) else []
        return _page(request, "loop.html", v, "loop", loaded=loaded, rounds=rounds,
                     chart=reports.rounds_chart(rounds) if len(rounds) > 1 else None)

    @router.get("/training")
    def training(request: Request, v: ViewerDep) -> HTMLResponse:
        loss = reports.read_curve(paths.train_dir / "loss.csv", "train_loss")
        val = reports.read_curve(paths.train_dir / "val_loss.csv", "val_loss")
        spikes = reports.load_json(paths.train_dir / "spikes.json")
        bisects = reports.bisect_reports(paths.bisect_dir)
        chart = None
        if loss.data and loss.data["step"]:
            xs, ys = reports.thin(loss.data["step"], loss.data["train_loss"])
            chart = {"step": xs, "train_loss": ys,
                     "val_step": (val.data or {}).get("step", []), "val_loss": (val.data or {}).get("val_loss", [])}
        by_step = {name.rsplit("-", 1)[-1]: name for name in bisects}
        return _page(request, "training.html", v, "training", loss=loss, val=val, spikes=spikes, chart=chart,
                     bisects=bisects, bisect_by_step=by_step, paths=paths)

    @router.get("/training/bisect/{name}")
    def bisect_report(request: Request, v: ViewerDep, name: str) -> HTMLResponse:
        found = reports.bisect_reports(paths.bisect_dir).get(name)
        if found is None:
            raise ConsoleError(404, f"no bisect report {name!r} in {paths.bisect_dir}")
        return _page(request, "bisect.html", v, "training", name=name, loaded=reports.load_json(found))

    @router.get("/data")
    def data(request: Request, v: ViewerDep) -> HTMLResponse:
        loaded = reports.load_json(paths.data_stats)
        funnel = (loaded.data or {}).get("funnel") or {} if isinstance(loaded.data, dict) else {}
        # Params order (raw → clean → dedup), then by size: each stage only removes documents, and a params
        # file written by a YAML dumper that sorts keys must not reorder the funnel.
        stages = [st for st in funnel_order if st in funnel] + [st for st in funnel if st not in funnel_order]
        stages.sort(key=lambda st: -int((funnel[st] or {}).get("documents") or 0))
        return _page(request, "data.html", v, "data", loaded=loaded, funnel_stages=stages)

    return router


def _safe_next(next_url: str) -> str:
    """Only a path inside the console (no open redirect to another site)."""
    return next_url if next_url.startswith(PREFIX) and "//" not in next_url and "\\" not in next_url else PREFIX


def _target(to: str, pct: float | None) -> str:
    """The form's target (``ab`` with its percent field) as a rollout target; a bad one is a 400 naming it."""
    if to == "ab" and pct is not None:
        to = f"ab:{pct:g}"
    try:
        store.parse_target(to)
    except store.StoreError as exc:
        raise ConsoleError(400, f"to: {exc}") from None
    return to


def _version(s, name: str):
    try:
        return store.get_version(s, name)
    except store.NotFound as exc:
        raise ConsoleError(404, str(exc)) from None


def _audit_rows(s) -> list[dict]:
    q = (select(AuditEvent, User.name).outerjoin(User, User.id == AuditEvent.user_id)
         .order_by(AuditEvent.id.desc()).limit(AUDIT_ROWS))
    return [{"at": a.created_at, "user": name, "action": a.action, "target": a.target, "detail": a.detail}
            for a, name in s.execute(q)]


def mount(app: FastAPI, params=None) -> None:
    """Add the console to a gateway app: pages under /console, static files, HTML error pages."""
    app.include_router(build_router(params))
    app.mount(f"{PREFIX}/static", StaticFiles(directory=str(HERE / "static")), name="console-static")

    @app.exception_handler(LoginRequired)
    async def _login(request: Request, _exc):
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        if request.method != "GET":
            return _page(request, "error.html", None, "error", status=401,
                         status_code=401, message="sign in first: send `Authorization: Bearer <key>` or use the login form")
        return RedirectResponse(f"{PREFIX}/login?next={quote(target)}", status_code=303)

    @app.exception_handler(ConsoleError)
    async def _error(request: Request, exc: ConsoleError):
        return _page(request, "error.html", None, "error", status=exc.status, status_code=exc.status,
                     message=exc.message)
