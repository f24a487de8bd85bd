"""Real editor clients for the tests: tabby-agent (npm, pinned in package.json) run as a child process.

tabby-agent 1.5.0 speaks two protocols on stdio, both used by Tabby's own IDE plugins:
- ``tabby-agent --lsp --stdio``: the Language Server Protocol (JSON-RPC 2.0 with Content-Length framing),
  which any LSP editor (Neovim, Emacs lsp-mode, Helix, coc.nvim) talks. In 1.5.0 it answers
  ``textDocument/completion``; it has no LSP request for reporting what the user did with a completion.
- ``tabby-agent`` (no flag): Tabby's JSON-lines agent protocol (``[id, {"func", "args"}]`` per line), which
  the Vim and IntelliJ plugins of that release speak; it exposes every agent function, ``postEvent`` included,
  so that is how an editor reports view / select / dismiss through the agent.

The clients here are written by hand because they are small and the point is to speak the wire protocols
exactly as an editor does (no LSP client library for Python drives a server over a subprocess pipe without
an event loop of its own). Every message both ways is kept in ``transcript`` (docs/serving.md shows one).
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
AGENT_BIN = ROOT / "node_modules" / ".bin" / "tabby-agent"


def agent_home(tmp: Path, endpoint: str | None = None, token: str | None = None) -> dict[str, str]:
    """A HOME for the agent with ``~/.tabby-client/agent/config.toml`` pointing at ``endpoint`` with ``token``.

    That file is where every Tabby IDE extension's agent reads its server and token (docs/serving.md); the
    anonymous usage tracking (which would call Tabby's own servers) is switched off, as the gateway's
    /v1beta/server_setting also asks. Without ``endpoint`` the editor passes the server in ``initialize``.
    """
    cfg = tmp / ".tabby-client" / "agent"
    cfg.mkdir(parents=True, exist_ok=True)
    server = f'[server]\nendpoint = "{endpoint}"\ntoken = "{token}"\n\n' if endpoint else ""
    (cfg / "config.toml").write_text(server + '[logs]\nlevel = "silent"\n\n[anonymousUsageTracking]\ndisable = true\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HTTP_PROXY", "HTTPS_PROXY", "http_", "https_"))}
    env.update(HOME=str(tmp), NO_PROXY="127.0.0.1,localhost")
    return env


class _Agent:
    def __init__(self, args: list[str], env: dict[str, str]):
        if not AGENT_BIN.exists():
            raise RuntimeError(f"{AGENT_BIN} is missing: run `npm ci` (make test does) in {ROOT}")
        # cwd: the agent's log rotator leaves an audit.json in its working directory
        self.proc = subprocess.Popen([str(AGENT_BIN), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=env, cwd=env["HOME"])
        self.transcript: list[dict] = []
        self.t0 = time.monotonic()
        self.responses: dict[int, queue.Queue] = {}
        self.notifications: queue.Queue = queue.Queue()
        self.stderr: list[str] = []
        self.next_id = 1
        self.lock = threading.Lock()
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _log(self, direction: str, msg) -> None:
        self.transcript.append({"t": round(time.monotonic() - self.t0, 3), "dir": direction, "msg": msg})

    def _read_stderr(self) -> None:
        for line in self.proc.stderr:
            self.stderr.append(line.decode("utf-8", "replace"))

    def _waiter(self, rid: int) -> queue.Queue:
        with self.lock:
            return self.responses.setdefault(rid, queue.Queue())

    def wait(self, rid: int, timeout: float):
        try:
            return self._waiter(rid).get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no answer to request {rid} within {timeout}s; agent stderr: "
                               f"{''.join(self.stderr)[-2000:]}") from None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class LspClient(_Agent):
    """JSON-RPC 2.0 over stdio with ``Content-Length`` headers (the LSP base protocol)."""

    def __init__(self, env: dict[str, str]):
        super().__init__(["--lsp", "--stdio"], env)

    def _send(self, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self._log("editor->agent", payload)
        self.proc.stdin.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)
        self.proc.stdin.flush()

    def _read_stdout(self) -> None:
        out = self.proc.stdout
        while True:
            length = None
            while True:  # headers up to the blank line
                line = out.readline()
                if not line:
                    return
                line = line.strip()
                if not line:
                    break
                name, _, value = line.decode().partition(":")
                if name.lower() == "content-length":
                    length = int(value)
            msg = json.loads(out.read(length))
            self._log("agent->editor", msg)
            if "method" in msg and "id" in msg:  # a request from the server: answer it as a plain editor would
                self._send({"jsonrpc": "2.0", "id": msg["id"], "result": None})
            elif "method" in msg:
                self.notifications.put(msg)
            else:
                self._waiter(msg["id"]).put(msg)

    def request(self, method: str, params: dict | None, timeout: float = 30) -> dict:
        with self.lock:
            rid, self.next_id = self.next_id, self.next_id + 1
        self._send({"jsonrpc": "2.0", "id": rid, "method": method, **({} if params is None else {"params": params})})
        msg = self.wait(rid, timeout)
        if "error" in msg:
            raise RuntimeError(f"{method} failed: {msg['error']}")
        return msg["result"]

    def notify(self, method: str, params: dict | None) -> None:
        self._send({"jsonrpc": "2.0", "method": method, **({} if params is None else {"params": params})})

    def shutdown(self) -> None:
        try:
            self.request("shutdown", None, timeout=10)
            self.notify("exit", None)
            self.proc.wait(10)
        finally:
            self.close()


class JsonLinesClient(_Agent):
    """Tabby's agent protocol: ``[id, {"func": name, "args": [...]}]`` per line; answers ``[id, result]``,
    agent events ``[0, {"event": ...}]``."""

    def __init__(self, env: dict[str, str]):
        super().__init__([], env)

    def _read_stdout(self) -> None:
        for line in self.proc.stdout:
            if not line.strip():
                continue
            try:
                rid, data = json.loads(line)
            except ValueError:  # the agent's log rotator can print a plain line; an editor skips it too
                self._log("agent stdout (not protocol)", line.decode("utf-8", "replace").rstrip())
                continue
            self._log("agent->editor", [rid, data])
            if rid == 0:
                self.notifications.put(data)
            else:
                self._waiter(rid).put(data)

    def call(self, func: str, *args, timeout: float = 30):
        with self.lock:
            rid, self.next_id = self.next_id, self.next_id + 1
        payload = [rid, {"func": func, "args": list(args)}]
        self._log("editor->agent", payload)
        self.proc.stdin.write((json.dumps(payload) + "\n").encode())
        self.proc.stdin.flush()
        return self.wait(rid, timeout)

    def wait_status(self, status: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.call("getStatus") == status:
                return
            time.sleep(0.1)
        raise TimeoutError(f"agent status never became {status!r}: {self.call('getStatus')!r}; "
                           f"issues {self.call('getIssues')!r}")
