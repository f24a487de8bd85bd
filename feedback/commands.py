"""Handlers of `ownllm serve`, `ownllm feedback ...` and `ownllm models ...` (imported only when run)."""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime, timedelta
from pathlib import Path

from pipeline.cli import UserError
from feedback.config import FeedbackParams, load_feedback_params
from pipeline.tracking import say, write_json


def _setup(args) -> tuple[FeedbackParams, str]:
    params = load_feedback_params(args.params)
    return params, getattr(args, "db_url", None) or params.serve.db_url


def _factory(url: str):
    """A session factory for a store that must already be at head (a clear error otherwise)."""
    from feedback.db import StoreNotAtHead, check_at_head, make_engine, session_factory

    engine = make_engine(url)
    try:
        check_at_head(engine)
    except StoreNotAtHead as exc:
        raise UserError(str(exc)) from None
    return session_factory(engine)


def eval_results(report_dir: Path) -> dict | None:
    """The evaluation reports of a model (``reports/eval/<name>/*.json``) keyed by file stem, if any."""
    out = {}
    for f in sorted(report_dir.glob("*.json")) if report_dir.is_dir() else []:
        try:
            out[f.stem] = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # an unreadable report is not lineage; the registry keeps what it can read
    return out or None


def ensure_model_registered(factory, model_dir: str, name: str, repo: str = ".") -> tuple[str, bool]:
    """Register ``model_dir`` as version ``name`` unless a version of that name exists.

    It serves everyone when no version does yet (a fresh store), staff otherwise. Returns (name, created).
    """
    from feedback import store
    from feedback.lineage import lineage
    from sqlalchemy import select

    from feedback.models import ModelVersion

    with factory.begin() as s:
        if s.scalar(select(ModelVersion).where(ModelVersion.name == name)) is not None:
            return name, False
        state = "all" if store.current_all(s) is None else "staff"
        info = lineage(model_dir, None, repo)
        info["eval_results"] = eval_results(Path(repo) / "reports" / "eval" / name)
        store.register_model_version(s, name, str(Path(model_dir).resolve()), state=state, **info)
    return name, True


# ------------------------------------------------------------------------------------------------ serve
def serve(args) -> int:
    # OpenMP threads that spin while waiting (libgomp's default) starve the event loop and the engine's own
    # Python callbacks on a busy machine: 8 concurrent completions ran at 1.9 req/s spinning, 33.6 passive
    # (docs/BENCHMARKS.md). Set before the engines load; an explicit setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import uvicorn

    from feedback.app import APP_FACTORY, SERVE_CONFIG_ENV, create_app
    from feedback.db import StoreNotAtHead

    params, url = _setup(args)
    overrides = {k: v for k, v in (("db_url", url), ("host", args.host), ("port", args.port),
                                   ("backend", args.backend), ("model_dir", args.model_dir),
                                   ("upstream_url", args.upstream_url), ("num_threads", args.num_threads),
                                   ("engine_threads", args.engine_threads),
                                   ("engine", args.engine), ("quantization", args.quantization))
                 if v is not None}
    cfg = params.serve.model_copy(update=overrides)
    factory = _factory(cfg.db_url)
    if cfg.backend == "local" and (Path(cfg.model_dir) / "config.json").is_file():
        from feedback import store

        with factory() as s:
            empty = not store.list_versions(s)
        if empty:
            name, _ = ensure_model_registered(factory, cfg.model_dir, Path(cfg.model_dir).name)
            say(f"[serve] registered {cfg.model_dir} as model version {name!r} (serving everyone)")
    try:
        app = create_app(cfg, params=params)  # built here once so a bad store or config fails now, clearly
    except StoreNotAtHead as exc:
        raise UserError(str(exc)) from None
    workers = args.workers or 1
    say(f"[serve] http://{cfg.host}:{cfg.port}/v1 backend={cfg.backend} engine={cfg.engine} workers={workers} "
        f"store={app.state.engine.url!r}")
    say(f"[serve] console: http://{cfg.host}:{cfg.port}/console (sign in with a key from `ownllm feedback create-key`)")
    del app
    # Each worker process builds its own app from the same parameters (uvicorn needs an import string, not an
    # app object, to start several), so N workers serve N times the store traffic.
    os.environ[SERVE_CONFIG_ENV] = params.model_copy(update={"serve": cfg}).model_dump_json()
    uvicorn.run(APP_FACTORY, factory=True, host=cfg.host, port=cfg.port, workers=workers, log_level="info")
    return 0


# -------------------------------------------------------------------------------------------- feedback
def migrate(args) -> int:
    from feedback.db import current_revision, downgrade, make_engine, upgrade

    _, url = _setup(args)
    (downgrade if args.down else upgrade)(url, args.revision)
    say(f"[feedback migrate] {make_engine(url).url!r} now at revision {current_revision(make_engine(url))}")
    return 0


def create_key(args) -> int:
    from feedback import store

    _, url = _setup(args)
    store_code = getattr(args, "store_code", None)
    with _factory(url).begin() as s:
        key = store.create_key(s, args.user, staff=True if args.staff else None)
        if store_code is not None:
            store.get_or_create_user(s, args.user).store_code = store_code == "yes"
    print(key)  # the only time the key is ever shown: only its hash is stored
    say(f"[feedback create-key] key for {args.user!r}{' (staff)' if args.staff else ''}"
        f"{' (no code text stored)' if store_code == 'no' else ''}; store it now, it cannot be shown again")
    return 0


def import_bounties(args) -> int:
    from feedback import store
    from feedback.bounties import read_jsonl

    _, url = _setup(args)
    path = Path(args.file)
    if not path.is_file():
        raise UserError(f"bounty file not found: {path}")
    records, skipped, errors = read_jsonl(path)
    for e in errors:
        print(f"skipped {e}", file=sys.stderr)
    added = 0
    with _factory(url).begin() as s:
        for r in records:
            _, created = store.add_bounty(s, **r.as_dict(), source=args.source)
            added += created
    say(f"[feedback import-bounties] {added} added, {len(records) - added} already present, "
        f"{sum(skipped.values())} skipped {dict(skipped) or ''}".rstrip())
    return 0


def _parse_time(text: str | None, name: str) -> datetime | None:
    if text is None:
        return None
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise UserError(f"--{name}: not an ISO date/time: {text!r}") from None
    return t.replace(tzinfo=None) if t.tzinfo is None else t.astimezone(tz=None).replace(tzinfo=None)


def write_report(factory, out_dir: str | Path, since, until, params: FeedbackParams, window: dict) -> dict:
    from feedback.analytics import plot, report

    with factory() as s:
        rep = report(s, since, until, params.feedback.ab_alpha, params.feedback.ab_power,
                     params.feedback.ignored_after_s)
    rep["window"] = window
    out = Path(out_dir)
    write_json(out / "acceptance.json", rep)
    plot(rep, out / "acceptance.png")
    return rep


def report(args) -> int:
    from feedback.analytics import render
    from feedback.models import utcnow

    params, url = _setup(args)
    factory = _factory(url)
    until = _parse_time(args.until, "until")
    since = _parse_time(args.since, "since")
    days = args.days if args.days is not None else params.feedback.report_days
    if since is None:
        since = (until or utcnow()) - timedelta(days=days)
        window = {"days": days, **({"until": until.isoformat()} if until else {})}
    else:
        window = {"since": since.isoformat(), **({"until": until.isoformat()} if until else {})}
    out = args.out or params.feedback.reports_dir
    rep = write_report(factory, out, since, until, params, window)
    print(render(rep))
    say(f"[feedback report] {sum(r['decided'] for r in rep['by_version'])} decisions, "
        f"{sum(r['ignored'] for r in rep['by_version'])} ignored, "
        f"{len(rep['by_version_language'])} version x language cells → {out}/acceptance.json, acceptance.png")
    return 0


def purge(args) -> int:
    from feedback import store

    params, url = _setup(args)
    days = args.days if args.days is not None else params.serve.retention_days
    with _factory(url).begin() as s:
        n = store.purge_texts(s, days)
    say(f"[feedback purge] cleared texts of {n} completions older than {days} days (rows and counts kept)")
    return 0


# ---------------------------------------------------------------------------------------------- models
def models_list(args) -> int:
    from feedback import store

    _, url = _setup(args)
    with _factory(url)() as s:
        rows = [{"name": v.name, "state": v.rollout_state.value + (f":{v.ab_percent:g}" if v.ab_percent else ""),
                 "parent": v.parent.name if v.parent else None, "git_rev": v.git_rev,
                 "dvc_lock_hash": v.dvc_lock_hash, "snapshot_hash": v.snapshot_hash, "model_hash": v.model_hash,
                 "path": v.path, "created_at": v.created_at.isoformat(timespec="seconds")}
                for v in store.list_versions(s)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'name':<24} {'state':<10} {'parent':<16} {'git_rev':<10} {'created_at':<20} path")
    for r in rows:
        print(f"{r['name']:<24} {r['state']:<10} {r['parent'] or '-':<16} {(r['git_rev'] or '-')[:8]:<10} "
              f"{r['created_at']:<20} {r['path']}")
    return 0


def models_register(args) -> int:
    from feedback import store
    from feedback.lineage import lineage

    _, url = _setup(args)
    if not (Path(args.model_dir) / "config.json").is_file():
        raise UserError(f"no Hugging Face model in {args.model_dir} (config.json missing)")
    state, _pct = _target(args.state)
    filt = None
    if getattr(args, "filter", None):
        import json

        try:
            filt = json.loads(Path(args.filter).read_text(encoding="utf-8"))
        except OSError as exc:
            raise UserError(f"--filter {args.filter}: {exc.strerror or exc}") from None
        except json.JSONDecodeError as exc:
            raise UserError(f"--filter {args.filter}: not valid JSON ({exc.msg})") from None
    with _factory(url).begin() as s:
        try:
            mv = store.register_model_version(s, args.name, str(Path(args.model_dir).resolve()), parent=args.parent,
                                              snapshot_hash=args.snapshot_hash, state="staff",
                                              suggestion_filter=filt, filter_source=args.filter if filt else None,
                                              **lineage(args.model_dir, args.eval_report))
            if args.state != "staff":
                store.promote(s, mv.name, args.state)
        except store.StoreError as exc:
            raise UserError(str(exc)) from None
    say(f"[models register] {args.name} → {args.state}")
    return 0


def _target(text: str):
    from feedback import store

    try:
        return store.parse_target(text)
    except store.StoreError as exc:
        raise UserError(str(exc)) from None


def models_promote(args) -> int:
    from feedback import store

    _, url = _setup(args)
    _target(args.to)
    import getpass

    with _factory(url).begin() as s:
        try:  # the audit row names the operating-system user: the CLI has no API key
            before, after = store.promote_audited(s, args.version, args.to, None, "cli", os_user=getpass.getuser())
        except store.StoreError as exc:
            raise UserError(str(exc)) from None
    say(f"[models promote] {args.version} {before} → {after}")
    return 0


def models_retire(args) -> int:
    args.to = "retired"
    return models_promote(args)
