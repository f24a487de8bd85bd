"""`ownllm serve` as a real process: refuses an unmigrated store, registers the model dir, serves HTTP."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from sqlalchemy import select

from feedback import store
from feedback.db import session_factory, upgrade
from feedback.models import Completion
from gateway_fixtures import free_port


@pytest.mark.slow
def test_ownllm_serve_process(tmp_path, tiny_ct2_model_dir):
    """With the CTranslate2 conversion, so rows are completed after the reply: feedback sent at once, on a new
    connection (often to the other worker process), is stored against the stored text; stopping the server
    leaves no row pending. (The race itself, a worker reading a row the other has not completed, is too short to
    hit reliably here: test_completion_after_reply.py holds the write back to check it.)"""
    tiny_model_dir = tiny_ct2_model_dir
    url = f"sqlite:///{tmp_path / 'serve.db'}"
    # The installed console script (``python -m pipeline.cli`` would load a second copy of pipeline.cli).
    cmd = [str(Path(sys.executable).parent / "ownllm"), "serve", "--db-url", url, "--model-dir", str(tiny_model_dir)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    refused = subprocess.run(cmd + ["--port", str(free_port())], capture_output=True, text=True, timeout=120, env=env)
    assert refused.returncode == 2 and "never been migrated" in refused.stderr
    upgrade(url)
    with session_factory(url).begin() as s:
        key = store.create_key(s, "erin")
    port = free_port()
    # --workers 2: uvicorn gets an app factory, so several processes serve (each its own app and engine).
    proc = subprocess.Popen(cmd + ["--port", str(port), "--workers", "2"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(base + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "ownllm serve did not come up"
            time.sleep(0.3)
        r = httpx.post(base + "/v1/completions", json={"model": "auto", "prompt": "import os\n", "max_tokens": 4},
                       headers={"Authorization": f"Bearer {key}"}, timeout=60)
        assert r.status_code == 200 and r.json()["model"] == tiny_model_dir.name
        workers = {c.pid for c in psutil.Process(proc.pid).children(recursive=True)
                   if "spawn_main" in " ".join(c.cmdline())}  # uvicorn's worker processes
        assert httpx.get(base + "/healthz").json()["pid"] in workers and len(workers) >= 2
        # An editor's partial accept of the whole suggestion right after each reply, each request on a new
        # connection: whichever worker gets it waits for (or retries) the row until its text is stored.
        auth = {"Authorization": f"Bearer {key}"}
        for i in range(20):
            got = httpx.post(base + "/v1/completions", headers=auth, timeout=60,
                             json={"model": "auto", "prompt": f"import os\nx = {i}\n", "max_tokens": 6,
                                   "temperature": 0}).json()
            text = got["choices"][0]["text"]
            fb = httpx.post(base + "/v1/feedback", headers=auth, timeout=60,
                            json={"id": got["id"], "event": "accepted", "accepted_chars": len(text)})
            assert fb.status_code == 200, fb.text
    finally:
        proc.terminate()
        proc.wait(30)
    with session_factory(url)() as s:
        (v,) = store.list_versions(s)
        assert v.rollout_state.value == "all" and v.model_hash and store.counts(s)["completions"] == 21
        assert {r.status for r in s.scalars(select(Completion))} == {"served"}  # none left pending at shutdown
        assert store.counts(s)["feedback_events"] == 20
