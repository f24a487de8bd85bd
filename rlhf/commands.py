"""Handlers of the `ownllm rlhf` commands: parse, call :mod:`rlhf.stages`, map errors to exit codes."""

from __future__ import annotations

from pipeline.cli import UserError
from rlhf.config import load_rlhf_params


def _db_url(args, params) -> str:
    return getattr(args, "db_url", None) or params.serve.db_url


def snapshot(args) -> int:
    import os

    from rlhf import stages
    from rlhf.snapshot import PARENT_FROM, PARENT_FROM_ENV

    params = load_rlhf_params(args.params)
    parent_from = args.parent or os.environ.get(PARENT_FROM_ENV) or "base"
    if parent_from not in PARENT_FROM:
        raise UserError(f"{PARENT_FROM_ENV}={parent_from!r}: expected one of {list(PARENT_FROM)}")
    stages.snapshot(params, _db_url(args, params), parent_from=parent_from)
    return 0


def sft(args) -> int:
    from rlhf import stages
    from rlhf.tune import TuneError

    try:
        stages.sft(load_rlhf_params(args.params))
    except TuneError as exc:
        raise UserError(str(exc)) from None
    return 0


def dpo(args) -> int:
    from rlhf import stages
    from rlhf.tune import TuneError

    try:
        stages.preference(load_rlhf_params(args.params))
    except TuneError as exc:
        raise UserError(str(exc)) from None
    return 0


def gate(args) -> int:
    from rlhf import stages

    try:
        stages.gate(load_rlhf_params(args.params))
    except (FileNotFoundError, ValueError) as exc:
        raise UserError(str(exc)) from None
    return 0


def register(args) -> int:
    from rlhf import stages

    params = load_rlhf_params(args.params)
    try:
        stages.register(params, _db_url(args, params), on_fail=args.on_fail)
    except stages.GateFailed:
        return 1
    except FileNotFoundError as exc:
        raise UserError(str(exc)) from None
    return 0


def loop_round(args) -> int:
    from rlhf import stages
    from rlhf.tune import TuneError

    params = load_rlhf_params(args.params)
    try:
        stages.loop_round(params, _db_url(args, params), args.round)
    except (TuneError, ValueError) as exc:
        raise UserError(str(exc)) from None
    return 0


def loop(args) -> int:
    from rlhf import stages

    try:
        stages.loop(load_rlhf_params(args.params))
    except (FileNotFoundError, ValueError) as exc:
        raise UserError(str(exc)) from None
    return 0


def refresh(args) -> int:
    from pipeline.tracking import say
    from rlhf.lock import LockBusy
    from rlhf.refresh import refresh as run_refresh

    params = load_rlhf_params(args.params)
    try:
        outcome = run_refresh(params, _db_url(args, params), args.runner)
    except LockBusy as exc:
        say(f"[rlhf refresh] {exc}")
        return 75  # EX_TEMPFAIL: try again later (systemd/cron see a distinct, non-fatal code)
    if outcome.status != "nothing_to_do":
        say(f"[rlhf refresh] {outcome.status}: snapshot {outcome.snapshot_hash[:12]}"
            + (f", version {outcome.version}" if outcome.version else ""))
    return outcome.exit_code


def lineage(args) -> int:
    from feedback.store import NotFound
    from rlhf.lineage import check, describe, render

    params = load_rlhf_params(args.params)
    try:
        info = describe(_db_url(args, params), args.version)
    except NotFound as exc:
        raise UserError(str(exc)) from None
    print(render(info))
    if args.check:
        ok, msg = check(info, args.check)
        print(msg)
        return 0 if ok else 1
    return 0
