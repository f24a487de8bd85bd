"""PostgreSQL going away under a running gateway: 503 with nothing half-written, then recovery."""

from __future__ import annotations

import socket
import threading

import httpx
import pytest
from sqlalchemy.engine import make_url

from gateway_fixtures import fresh_pg_url, require_pg, live_server, start_gateway

pytestmark = pytest.mark.postgres


class TcpProxy:
    """A TCP forwarder 127.0.0.1:port → PostgreSQL that can drop every connection and refuse new ones.

    Written by hand (40 lines) because it must cut live connections on demand, which is the outage."""

    def __init__(self, target: tuple[str, int]):
        self.target, self.conns, self.up = target, [], True
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            if not self.up:
                client.close()
                continue
            upstream = socket.create_connection(self.target)
            self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a, b):
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def down(self):
        self.up = False
        for c in self.conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.conns = []

    def close(self):
        self.down()
        self.sock.close()


def test_postgres_outage_is_503_and_recovers(tiny_backend, tiny_model_dir):
    direct = fresh_pg_url()
    u = make_url(direct)
    proxy = TcpProxy((u.host, u.port or 5432))
    via = u.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    app, keys, factory = start_gateway(via, tiny_backend, tiny_model_dir)
    auth = {"Authorization": f"Bearer {keys['alice']}"}
    body = {"model": "auto", "prompt": "import os\n", "max_tokens": 3, "temperature": 0}
    try:
        with live_server(app) as url:
            cid = httpx.post(url + "/v1/completions", json=body, headers=auth, timeout=60).json()["id"]
            proxy.down()
            for path, payload in (("/v1/completions", body), ("/v1/feedback", {"id": cid, "event": "accepted"})):
                r = httpx.post(url + path, json=payload, headers=auth, timeout=60)
                assert r.status_code == 503 and r.json()["error"]["type"] == "store_unavailable", r.text
            assert httpx.get(url + "/healthz", timeout=60).status_code == 503
            proxy.up = True
            ok = httpx.post(url + "/v1/feedback", json={"id": cid, "event": "accepted"}, headers=auth, timeout=60)
            assert ok.status_code == 200 and ok.json()["duplicate"] is False
    finally:
        proxy.close()
    from feedback import store
    from feedback.db import session_factory

    with session_factory(direct)() as s:
        counts = store.counts(s)
    assert (counts["completions"], counts["feedback_events"]) == (1, 1)


def test_no_postgres_skips_on_a_laptop_and_fails_under_ci(monkeypatch):
    """A missing server must not let CI pass green: `CI` set turns the skip into a failure."""
    monkeypatch.delenv("OWNLLM_TEST_PG_URL", raising=False)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="OWNLLM_TEST_PG_URL is not set"):
        require_pg()
    monkeypatch.setenv("CI", "1")
    with pytest.raises(pytest.fail.Exception, match="CI is set"):
        require_pg()
    monkeypatch.setenv("OWNLLM_TEST_PG_URL", "postgresql+psycopg://ownllm@127.0.0.1:5432/x")
    assert require_pg() == "postgresql+psycopg://ownllm@127.0.0.1:5432/x"
