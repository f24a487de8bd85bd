"""Group commit for ``POST /v1/feedback``: one transaction for every feedback request that is waiting.

Editors send one event per request (Continue, Tabby, the simulator), so the gateway sees many tiny writes.
Written one transaction each, every request pays a connection checkout, an API-key query, two lookups, an
insert and a commit (an fsync in PostgreSQL): ~140 requests/s on two cores, with the event loop mostly idle
and the threads waiting on the store. Here a single writer thread takes every request queued while the
previous transaction ran and writes them all in one transaction with a constant number of queries (keys,
completions, decisions, insert; :func:`feedback.store.record_feedback_many`), then answers each request.
Nothing is lost and nothing is claimed that is not stored:

- a request is answered only after the commit that holds its events returned;
- a request that is wrong (unknown completion, a contradicting decision, an unknown key) gets its own error
  and adds nothing; the rest of its group is stored as if each had its own transaction;
- a store error fails the whole group (nothing of it was committed), and every request in it gets the error
  (the gateway's 503), never an "ok";
- a request naming a completion still ``pending`` (its rows are completed after the reply, maybe by another
  process: feedback/inflight.py) adds nothing and is queued again a moment later, for up to ``pending_wait_s``;
  after that it is decided against what is stored.

Why not several processes or an async driver instead: both still pay one commit and the per-request queries,
and on two shared cores more processes only add context switches (``--workers 2`` measured 1.4x for two
processes). Grouping removes the per-request store work itself; ``--workers`` still multiplies it.
No library does this for SQLAlchemy sessions (PostgreSQL's own ``commit_delay`` only merges the fsyncs of
separate transactions, not their queries), hence the small hand-written queue.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from feedback import store
from feedback.inflight import PENDING_POLL_S
from feedback.models import ApiKey, User

MAX_GROUP = 512  # requests per transaction: bounds one transaction's size and a request's wait behind it


class UnknownKey(Exception):
    """The request's API key matches no live key (the gateway answers 401)."""


@dataclass
class _Pending:
    key: str
    events: list[store.FeedbackInput]
    future: Future
    defer_until: float  # time.monotonic(): until then, a completion still pending is waited for (queued again)


class GroupCommitWriter:
    """Queue feedback requests; one thread writes whatever is queued in one transaction, then answers them.

    There is no timer: while one transaction runs, the requests that arrive queue up and form the next group,
    so a lone request is written at once and a busy gateway writes large groups.
    """

    def __init__(self, factory: sessionmaker[Session], max_group: int = MAX_GROUP, pending_wait_s: float = 5.0):
        self.factory, self.max_group, self.pending_wait_s = factory, max_group, pending_wait_s
        self._lock = threading.Lock()
        self._queue: list[_Pending] = []
        self._writing = False
        self.groups = 0  # transactions committed (tests and benchmarks read it)

    def submit(self, key: str, events: list[store.FeedbackInput]) -> Future:
        """Queue one request; the future gets its results after its commit, or its error."""
        fut: Future = Future()
        self._enqueue(_Pending(key, events, fut, time.monotonic() + self.pending_wait_s))
        return fut

    def _enqueue(self, p: _Pending) -> None:
        with self._lock:
            self._queue.append(p)
            start = not self._writing
            self._writing = True
        if start:  # the thread lives while there is work, so an idle gateway (or a test's) holds none
            threading.Thread(target=self._drain, name="ownllm-feedback-writer", daemon=True).start()

    def _drain(self) -> None:
        while True:
            with self._lock:
                group, self._queue = self._queue[:self.max_group], self._queue[self.max_group:]
                if not group:
                    self._writing = False
                    return
            # a request whose client left (its awaiting task cancelled the future) is not written
            # (one queued again after waiting for a pending completion is already running)
            group = [p for p in group if p.future.running() or p.future.set_running_or_notify_cancel()]
            if group:
                self._write(group)

    def _write(self, group: list[_Pending]) -> None:
        try:
            with self.factory.begin() as s:
                users = _users_by_key(s, {p.key for p in group})
                known = [p for p in group if p.key in users]
                now = time.monotonic()
                results = store.record_feedback_many(s, [(users[p.key], p.events) for p in known],
                                                     [now < p.defer_until for p in known])
            # committed: only now is any request told its events are stored
        except BaseException as exc:  # noqa: BLE001 - the store failed: nothing of this group is stored
            for p in group:
                p.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        self.groups += 1
        for p in group:
            if p.key not in users:
                p.future.set_exception(UnknownKey())
        for p, res in zip(known, results):
            if isinstance(res, store.StillPending):  # nothing of it was written: try again in a moment
                threading.Timer(PENDING_POLL_S, self._enqueue, (p,)).start()
            elif isinstance(res, Exception):
                p.future.set_exception(res)
            else:
                p.future.set_result(res)


def _users_by_key(s: Session, keys: set[str]) -> dict[str, User]:
    """store.authenticate for a whole group in one query."""
    by_hash = {store.sha256(k): k for k in keys}
    rows = s.execute(select(ApiKey.key_hash, User).join(User, ApiKey.user_id == User.id)
                     .where(ApiKey.key_hash.in_(by_hash), ApiKey.revoked_at.is_(None))).all()
    return {by_hash[h]: u for h, u in rows}
