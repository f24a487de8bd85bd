"""`ownllm data ingest|clean|dedup`: params, the engine ``engine:`` names, a tracked run, a one-line summary."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator

from pipeline.cli import UserError


@contextmanager
def _stage(stage: str, args, check: Callable | None = None) -> Iterator[tuple]:
    """(params, engine, tracked run) of one stage; bad input (a missing source or dataset, or what ``check``
    raises as ValueError before any work) is a user error."""
    from pipeline.config import load_params
    from pipeline.data.engine import make_engine
    from pipeline.data.ingest import SourceError
    from pipeline.tracking import stage_run

    params = load_params(args.params)
    if check is not None:
        try:
            check(params)
        except ValueError as exc:
            raise UserError(str(exc)) from None
    engine = make_engine(params)
    try:
        with stage_run(stage, params) as run:
            yield params, engine, run
    except (SourceError, FileNotFoundError) as exc:
        raise UserError(str(exc)) from None
    finally:
        engine.close()


def ingest(args) -> int:
    from pipeline.tracking import say

    with _stage("ingest", args) as (params, engine, run):
        summary = engine.ingest(params)
        run.summary(summary)
    say(f"[ingest] {summary['documents']} documents ({summary['bytes'] / 1e6:.1f} MB) from "
        f"{len(params.data.sources)} sources; {summary['rejected']} rejected {summary['rejected_by_reason']}")
    return 0


def clean(args) -> int:
    from pipeline.data.clean import STAGE, clean_steps
    from pipeline.tracking import say

    # An unknown language or a missing parser wheel: one clear error before any work (clean_steps raises it).
    with _stage(STAGE, args, check=clean_steps) as (params, engine, run):
        summary = engine.clean(params)
        run.summary(summary)
    for reason, n in summary["rejected_by_reason"].items():
        say(f"[clean]   {reason:<22} {n:>6}")
    pii = summary["pii_redactions"]
    say(f"[clean] kept {summary['documents']}/{summary['documents_in']} documents "
        f"({summary['bytes'] / 1e6:.1f} MB); {summary['rejected']} rejected; PII redacted: "
        f"{pii['email']} emails, {pii['ip_address']} IPs, {pii['key']} keys in {summary['documents_with_pii']} documents")
    return 0


def dedup(args) -> int:
    from pipeline.data.dedup_spec import STAGE
    from pipeline.tracking import say

    start = time.perf_counter()
    with _stage(STAGE, args) as (params, engine, run):
        summary = engine.dedup(params)
        run.summary(summary)
    say(f"[dedup] {summary['documents_in']} → {summary['documents_out']} documents: "
        f"{summary['exact_duplicates']} exact and {summary['near_duplicates']} near duplicates removed "
        f"({summary['cross_source_duplicates']} across sources) in {time.perf_counter() - start:.1f}s")
    return 0
