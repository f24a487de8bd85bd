"""Bounded load test on 127.0.0.1: 32 concurrent clients, completion + feedback; nothing lost."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from gateway_fixtures import live_server, start_gateway

CLIENTS, ROUNDS = 32, 2


def _client(url: str, key: str, i: int) -> list[tuple[str, str]]:
    done = []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as c:
        for r in range(ROUNDS):
            body = {"model": "auto", "prompt": f"def f_{i}_{r}(x):\n    ", "max_tokens": 4, "temperature": 0,
                    "language": "python"}
            resp = c.post("/v1/completions", json=body)
            resp.raise_for_status()
            cid = resp.json()["id"]
            kind = "accepted" if (i + r) % 3 == 0 else "rejected"
            c.post("/v1/feedback", json={"id": cid, "event": kind, "time_to_decision_ms": 100}).raise_for_status()
            done.append((cid, kind))
    return done


def test_concurrent_clients_lose_nothing(empty_db_url, tiny_backend, tiny_model_dir):
    app, keys, factory = start_gateway(empty_db_url, tiny_backend, tiny_model_dir)
    users = list(keys)
    t0 = time.monotonic()
    with live_server(app) as url, ThreadPoolExecutor(CLIENTS) as pool:
        results = list(pool.map(lambda i: _client(url, keys[users[i % len(users)]], i), range(CLIENTS)))
    assert time.monotonic() - t0 < 240
    served = [x for r in results for x in r]
    assert len(served) == CLIENTS * ROUNDS and len({cid for cid, _ in served}) == len(served)
    from feedback import store

    with factory() as s:
        counts = store.counts(s)
    assert counts["completions"] == len(served)
    assert counts["feedback_events"] == len(served)
    from sqlalchemy import func, select

    from feedback.models import FeedbackEvent, FeedbackKind

    with factory() as s:
        accepted = s.scalar(select(func.count()).where(FeedbackEvent.kind == FeedbackKind.accepted))
    assert accepted == sum(kind == "accepted" for _, kind in served)
