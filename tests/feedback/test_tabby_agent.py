"""A real editor client: tabby-agent 1.5.0 (npm, pinned in package-lock.json) as a child process, driven the way
an editor drives it, against the gateway on 127.0.0.1 serving the tiny model.

- As an LSP server (``tabby-agent --lsp --stdio``, what Neovim / Emacs / Helix start): initialize, open a
  document, ask for a completion at a cursor; the items must be our completion, logged for the right user.
- Over the agent's JSON-lines protocol (what Tabby's Vim and IntelliJ plugins of that release speak, and the
  only way 1.5.0 lets an editor report what happened to a completion): completions with the file's workspace
  and git remote, then view / line-select / dismiss events, which must land in the store on the right rows.

Set OWNLLM_TRANSCRIPT_DIR to keep both JSON-RPC exchanges (docs/serving.md shows one).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import selectinload

import pytest
from editor_clients import JsonLinesClient, LspClient, agent_home
from feedback.config import FeedbackConfig
from gateway_fixtures import Gateway, live_server, start_gateway
from feedback.models import Completion, FeedbackEvent

SOURCE = ('"""Text helpers."""\n'
          "\n"
          "import textwrap\n"
          "\n"
          "\n"
          "def indent(text, prefix):\n"
          "    lines = text.splitlines(True)\n"
          "    return ''.join(prefix + line for line in lines)\n"
          "\n"
          "\n"
          "def dedent(text):\n"
          "    \n"
          "\n"
          "\n"
          "def shorten(text, width):\n"
          "    \n")
CURSOR = {"line": 11, "character": 4}  # inside dedent(), on the empty indented line


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, tiny_backend, tiny_model_dir):
    """The gateway with the tiny model. Greedy, that model only emits blank lines, which the agent rightly
    never shows; seeded sampling gives code-like text the agent shows as it would a real model's."""
    db = f"sqlite:///{tmp_path_factory.mktemp('agent') / 'feedback.db'}"
    app, keys, factory = start_gateway(db, tiny_backend, tiny_model_dir,
                                       feedback_cfg=FeedbackConfig(tabby_temperature=0.6, tabby_seed=1))
    with live_server(app) as url:
        yield Gateway(url, db, keys, app, factory)


def offset(text: str, line: int, character: int) -> int:
    return sum(len(x) for x in text.splitlines(True)[:line]) + character


def row_and_decision(gw, rid):
    with gw.factory() as s:
        return s.execute(select(Completion, FeedbackEvent).outerjoin(FeedbackEvent).options(selectinload(Completion.user))
                         .where(Completion.request_id == rid, Completion.choice_index == 0)).one()


def keep_transcript(name: str, transcript: list[dict]) -> None:
    out = os.environ.get("OWNLLM_TRANSCRIPT_DIR")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"{name}.json").write_text(json.dumps(transcript, indent=1))


def assert_is_our_text(shown: str, stored: str) -> None:
    """The agent post-processes (trims, limits the scope to the block): every line it shows is ours."""
    lines = [ln.strip() for ln in shown.splitlines() if ln.strip()]
    assert lines, f"the agent showed nothing of {stored!r}"
    for ln in lines:
        assert ln in stored, (ln, stored)


def test_lsp_editor_gets_our_completion(gateway, tmp_path):
    lsp = LspClient(agent_home(tmp_path, gateway.url, gateway.keys["alice"]))
    try:
        init = lsp.request("initialize", {
            "processId": os.getpid(), "clientInfo": {"name": "ownllm-test-editor", "version": "1.0"},
            "rootUri": "file:///work/proj", "capabilities": {"textDocument": {"completion": {
                "completionItem": {"snippetSupport": False}}}}})
        assert init["serverInfo"] == {"name": "tabby-agent", "version": "1.5.0"}
        assert "completionProvider" in init["capabilities"]
        lsp.notify("initialized", {})
        uri = "file:///work/proj/textutil.py"
        lsp.notify("textDocument/didOpen", {"textDocument": {"uri": uri, "languageId": "python", "version": 1,
                                                             "text": SOURCE}})
        result = lsp.request("textDocument/completion", {"textDocument": {"uri": uri}, "position": CURSOR,
                                                         "context": {"triggerKind": 1}}, timeout=60)
        items = result["items"]
        assert items, f"no completion items; agent stderr: {''.join(lsp.stderr)[-2000:]}"
        item = items[0]
        rid = item["data"]["completionId"]
        row, fb = row_and_decision(gateway, rid)
        assert (row.client, row.user.name, row.language) == ("tabby", "alice", "python")
        assert row.prompt.endswith("def dedent(text):\n    ") and fb is None
        assert_is_our_text(item["textEdit"]["newText"], row.completion)
        assert item["textEdit"]["range"]["start"] == CURSOR
        lsp.shutdown()
    finally:
        lsp.close()
        keep_transcript("lsp", lsp.transcript)


def test_editor_reports_view_select_and_dismiss_through_the_agent(gateway, tmp_path):
    agent = JsonLinesClient(agent_home(tmp_path))  # the editor passes server and token itself
    try:
        assert agent.call("initialize", {
            "config": {"server": {"endpoint": gateway.url, "token": gateway.keys["alice"]}},
            "clientProperties": {"session": {"client": "ownllm-test-editor"}}}) is True
        agent.wait_status("ready")
        workspace = "/work/proj"
        git = {"root": workspace, "remotes": [{"name": "origin", "url": "https://git.example.com/team/proj.git"}]}

        def complete(line, character):
            return agent.call("provideCompletions", {
                "filepath": f"{workspace}/pkg/textutil.py", "language": "python", "text": SOURCE,
                "position": offset(SOURCE, line, character), "manually": True, "workspace": workspace,
                "git": git}, {"signal": True}, timeout=60)

        first = complete(**CURSOR)
        second = complete(15, 4)  # another cursor: shorten()'s empty body
        assert first["choices"] and second["choices"], agent.transcript[-4:]
        for ev in ({"type": "view", "completion_id": first["id"], "choice_index": 0, "view_id": "v-1"},
                   {"type": "select", "completion_id": first["id"], "choice_index": 0, "view_id": "v-1",
                    "elapsed": 640, "select_kind": "line"},
                   {"type": "view", "completion_id": second["id"], "choice_index": 0, "view_id": "v-2"},
                   {"type": "dismiss", "completion_id": second["id"], "choice_index": 0, "view_id": "v-2",
                    "elapsed": 1500}):
            assert agent.call("postEvent", ev) is True, ev  # true only on a 2xx from the gateway
        agent.call("finalize")
    finally:
        agent.close()
        keep_transcript("jsonlines", agent.transcript)

    row, fb = row_and_decision(gateway, first["id"])
    assert (row.client, row.user.name, row.language) == ("tabby", "alice", "python")
    assert (row.filepath, row.git_url) == ("pkg/textutil.py", "https://git.example.com/team/proj.git")
    assert_is_our_text(first["choices"][0]["text"], row.completion)
    assert row.viewed_at is not None and fb.kind.value == "accepted" and fb.time_to_decision_ms == 640
    text = row.completion
    assert fb.accepted_chars == (text.index("\n") + 1 if "\n" in text else len(text))  # one line accepted
    row2, fb2 = row_and_decision(gateway, second["id"])
    assert row2.viewed_at is not None and fb2.kind.value == "rejected" and fb2.time_to_decision_ms == 1500
    assert row2.user.name == "alice" and row2.prompt.endswith("def shorten(text, width):\n    ")


def test_a_wrong_key_shows_as_unauthorized_in_the_editor(gateway, tmp_path):
    agent = JsonLinesClient(agent_home(tmp_path))
    try:
        agent.call("initialize", {"config": {"server": {"endpoint": gateway.url, "token": "ollm-not-a-key"}}})
        agent.wait_status("unauthorized")  # the gateway's 401 on /v1/health, as the agent reads it
        seen = [n.get("event") for n in list(agent.notifications.queue)]
        assert "authRequired" in seen
    finally:
        agent.close()
