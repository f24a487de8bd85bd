"""Recorded editing sessions replayed through the real API: what the user kept, derived from later requests.

Each session is the sequence of Tabby-shaped requests (and events) an editor sends while its user types,
in a 20-line window as tabby-agent sends it; kept_text must come out of the later requests' prefixes.
"""

from __future__ import annotations

from datetime import timedelta

import httpx
from sqlalchemy import select

from feedback.models import Completion

FILE = ("import math\n"
        "\n"
        "\n"
        "def area(r):\n"
        "    {cursor}\n"
        "\n"
        "\n"
        "def perimeter(r):\n"
        "    return 2 * math.pi * r\n"
        "\n"
        "\n"
        "def main():\n"
        "    print(area(2.0), perimeter(2.0))\n")


def window(text: str, lines: int = 20) -> str:
    """The last ``lines`` lines before the cursor, as tabby-agent's maxPrefixLines sends them."""
    return "".join(text.splitlines(keepends=True)[-lines:])


def request(gw, user, prefix, suffix, filepath="geo/shapes.py"):
    body = {"language": "python", "segments": {"prefix": window(prefix), "suffix": suffix, "filepath": filepath}}
    r = httpx.post(gw.url + "/v1/completions", json=body, headers=gw.headers(user), timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def event(gw, user, type_, rid):
    r = httpx.post(gw.url + "/v1/events", json={"type": type_, "completion_id": rid, "choice_index": 0},
                   headers=gw.headers(user), timeout=30)
    assert r.status_code == 200, r.text


def kept(gw, rid):
    with gw.factory() as s:
        row = s.scalar(select(Completion).where(Completion.request_id == rid))
        return row.kept_text, row.kept_source


HEAD, TAIL = FILE.split("{cursor}")


def test_typed_continuation_after_a_dismissed_suggestion(gateway):
    first = request(gateway, "alice", HEAD, TAIL)
    event(gateway, "alice", "view", first["id"])
    event(gateway, "alice", "dismiss", first["id"])
    # The user types the line by hand; the editor asks again mid-line (nothing settled yet) ...
    mid = request(gateway, "alice", HEAD + "return math.pi", " * r\n" + TAIL)
    assert kept(gateway, first["id"]) == (None, None)
    # ... and after Enter: the finished line is what the user kept at the first cursor.
    request(gateway, "alice", HEAD + "return math.pi * r * r\n    ", TAIL)
    assert kept(gateway, first["id"]) == ("return math.pi * r * r", "derived")
    assert kept(gateway, mid["id"]) == (" * r * r", "derived")  # the mid-line cursor's own rest of line


def test_an_accepted_suggestion_later_edited_keeps_the_edit(gateway):
    first = request(gateway, "bob", HEAD, TAIL, filepath="geo/edit.py")
    text = first["choices"][0]["text"].split("\n")[0] or "pass"
    event(gateway, "bob", "select", first["id"])
    request(gateway, "bob", HEAD + text + "\n    ", TAIL, filepath="geo/edit.py")
    assert kept(gateway, first["id"]) == (text, "derived")
    # The user goes back and rewrites the accepted line; the next request below it carries the edit.
    request(gateway, "bob", HEAD + "return math.pi * r ** 2\n\n\ndef perimeter(r):\n    ", "\n",
            filepath="geo/edit.py")
    assert kept(gateway, first["id"]) == ("return math.pi * r ** 2", "derived")


def test_cursor_jumps_elsewhere_in_the_file_derive_nothing(gateway):
    first = request(gateway, "alice", HEAD, TAIL, filepath="geo/jump.py")
    event(gateway, "alice", "dismiss", first["id"])
    # Down to main() without typing at the first cursor: the text between was already there.
    below = FILE.replace("{cursor}", "").split("    print")[0] + "    "
    request(gateway, "alice", below, "print(area(2.0), perimeter(2.0))\n", filepath="geo/jump.py")
    # Then up, above the first cursor.
    request(gateway, "alice", "import math\n", "\n\ndef area(r):\n", filepath="geo/jump.py")
    assert kept(gateway, first["id"]) == (None, None)


def test_same_text_in_another_file_or_by_another_user_derives_nothing(gateway):
    first = request(gateway, "alice", HEAD, TAIL, filepath="geo/mine.py")
    request(gateway, "alice", HEAD + "return 1\n    ", TAIL, filepath="geo/other.py")
    request(gateway, "bob", HEAD + "return 2\n    ", TAIL, filepath="geo/mine.py")
    assert kept(gateway, first["id"]) == (None, None)


def test_a_file_reopened_outside_the_window_derives_nothing(gateway):
    first = request(gateway, "alice", HEAD, TAIL, filepath="geo/reopen.py")
    with gateway.factory.begin() as s:  # the session was three hours ago (derive_window_s is 600 s)
        row = s.scalar(select(Completion).where(Completion.request_id == first["id"]))
        row.created_at -= timedelta(hours=3)
    request(gateway, "alice", HEAD + "return math.pi * r * r\n    ", TAIL, filepath="geo/reopen.py")
    assert kept(gateway, first["id"]) == (None, None)


def test_openai_shape_with_a_filepath_derives_too(gateway):
    def openai(prefix):
        r = httpx.post(gateway.url + "/v1/completions", headers=gateway.headers("alice"), timeout=60,
                       json={"model": "auto", "prompt": prefix, "suffix": TAIL, "max_tokens": 8, "temperature": 0,
                             "n": 2, "filepath": "geo/openai.py", "language": "python"})
        assert r.status_code == 200, r.text
        return r.json()

    first = openai(HEAD)
    openai(HEAD + "return math.pi * r * r\n    ")
    with gateway.factory() as s:
        rows = s.scalars(select(Completion).where(Completion.request_id == first["id"])).all()
        assert [(r.choice_index, r.kept_text, r.kept_source) for r in rows] == [
            (0, "return math.pi * r * r", "derived"), (1, "return math.pi * r * r", "derived")]
        assert rows[0].filepath == "geo/openai.py" and rows[0].client == "openai"
