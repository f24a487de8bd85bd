"""What the gateway keeps in memory to take store round trips off a completion's critical path.

Two things, both measured in docs/BENCHMARKS.md ("Issue 16, third pass"):

- :class:`LookupCache`: the API key's user, the route (rollout, A/B arm), backend and suggestion filter of a
  (key, requested model) pair, kept for ``serve.lookup_cache_s`` (1 s by default). A key revoked, or a rollout
  changed, by another process takes effect within that time; a rollout changed through this process (the
  console) clears the cache at once. Failures (an unknown key, no model) are never cached.
- :class:`InFlightCompletions`: a non-streamed completion's rows are committed as ``pending`` before the reply
  (nothing is served unlogged) and completed (``served``/``filtered``, text, latency) *after* the reply, in a
  small thread pool. Until that commit the request id is in flight here, and every reader of the stored text
  in this process (feedback with a partial accept, Tabby events, kept-text derivation, GET of a completion)
  waits for it first. Another process (``ownllm serve --workers N``) cannot see this map: it sees the row as
  ``pending`` and retries for up to ``serve.pending_feedback_wait_s`` (:func:`until_settled`,
  :class:`feedback.store.StillPending`). A crash between the reply and that commit leaves the row ``pending``:
  it says the completion was asked for and never recorded as served.

Hand-written because neither is a library's job here: the TTL map is a dozen lines under a lock (cachetools,
which has one, is not a dependency), and the in-flight map is the gateway's own bookkeeping of its writes.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from typing import Any, Callable, Hashable, Iterable, TypeVar

from feedback.store import StillPending

T = TypeVar("T")
MAX_ENTRIES = 10_000  # a cache this full is cleared of its expired entries (then of everything, if still full)
PENDING_POLL_S = 0.02  # how often a reader retries a row another process has not completed yet


class LookupCache:
    """A map whose entries expire ``ttl_s`` after they were put (``ttl_s`` 0: nothing is ever kept)."""

    def __init__(self, ttl_s: float):
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._entries: dict[Hashable, tuple[float, Any]] = {}
        self.hits = self.misses = 0  # tests and benchmarks read them

    def get(self, key: Hashable) -> Any | None:
        if self.ttl_s <= 0:
            return None
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None and hit[0] > time.monotonic():
                self.hits += 1
                return hit[1]
            self.misses += 1
            return None

    def put(self, key: Hashable, value: Any) -> None:
        if self.ttl_s <= 0:
            return
        now = time.monotonic()
        with self._lock:
            if len(self._entries) >= MAX_ENTRIES:
                self._entries = {k: v for k, v in self._entries.items() if v[0] > now}
                if len(self._entries) >= MAX_ENTRIES:
                    self._entries.clear()
            self._entries[key] = (now + self.ttl_s, value)

    def clear(self) -> None:
        """Forget everything (a rollout changed through this process)."""
        with self._lock:
            self._entries.clear()


class InFlightCompletions:
    """Completion rows being completed after their reply was sent: request id -> (user id, future of the commit)."""

    def __init__(self, workers: int = 2):
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="ownllm-complete")
        self._lock = threading.Lock()
        self._inflight: dict[str, tuple[int, Future]] = {}

    def submit(self, request_id: str, user_id: int, write: Callable[..., None], *args: Any) -> Future:
        """Run ``write(*args)`` in the pool; ``request_id`` is in flight until it returned or raised."""
        fut = self.pool.submit(write, *args)
        with self._lock:
            self._inflight[request_id] = (user_id, fut)
        fut.add_done_callback(lambda _f: self._forget(request_id, fut))
        return fut

    def _forget(self, request_id: str, fut: Future) -> None:
        with self._lock:
            if self._inflight.get(request_id, (None, None))[1] is fut:
                del self._inflight[request_id]

    def futures(self, request_ids: Iterable[str] = (), user_id: int | None = None) -> list[Future]:
        """The writes still in flight for these request ids, or (``user_id``) for all of a user's."""
        with self._lock:
            if user_id is not None:
                return [f for u, f in self._inflight.values() if u == user_id]
            return [self._inflight[r][1] for r in set(request_ids) if r in self._inflight]

    def wait(self, request_ids: Iterable[str] = (), user_id: int | None = None, timeout: float | None = None) -> None:
        """Block (a worker thread) until those writes are done, or ``timeout`` passed; their errors are the
        writer's to handle, not the reader's."""
        pending = self.futures(request_ids, user_id)
        if pending:
            wait_futures(pending, timeout)

    async def await_settled(self, request_ids: Iterable[str], timeout: float | None = None) -> None:
        """:meth:`wait` for the event loop (no thread held)."""
        pending = self.futures(request_ids)
        if pending:
            await asyncio.wait([asyncio.wrap_future(f) for f in pending], timeout=timeout)

    def drain(self, timeout: float | None = 60) -> None:
        """Wait for every write in flight now (a server stopping: its last rows are complete before the store
        is read, e.g. the simulator's report)."""
        with self._lock:
            pending = [f for _, f in self._inflight.values()]
        if pending:
            wait_futures(pending, timeout)

    def __len__(self) -> int:
        with self._lock:
            return len(self._inflight)

    def close(self) -> None:
        """Finish every write still queued (a graceful shutdown leaves no row ``pending``)."""
        self.pool.shutdown(wait=True)


def until_settled(attempt: Callable[[bool], T], wait_s: float) -> T:
    """``attempt(defer_pending)`` until it no longer raises :class:`StillPending`: a row another process is still
    completing is retried every ``PENDING_POLL_S`` for up to ``wait_s``; then ``attempt(False)`` decides against
    what is stored (for a ``pending`` row: its text is unknown, so a partial accept cannot be checked)."""
    deadline = time.monotonic() + wait_s
    while True:
        defer = time.monotonic() < deadline
        try:
            return attempt(defer)
        except StillPending:
            if not defer:  # pragma: no cover - attempt(False) never defers
                raise
            time.sleep(PENDING_POLL_S)
