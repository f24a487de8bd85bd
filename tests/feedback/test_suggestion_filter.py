"""The gateway applies a version's suggestion filter: real HTTP on 127.0.0.1, the real tiny model, a filter
fitted (rlhf/filter.py) on the tiny model's own suggestions, and the registry's weights check."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from sqlalchemy import select

from feedback import store
from feedback.analytics import acceptance
from feedback.backends import GenRequest
from feedback.db import session_factory, upgrade
from feedback.lineage import weights_hash
from feedback.models import Completion, FeedbackKind, ServeStatus
from feedback.suggestion_filter import REGISTRY_KEY, filter_input
from gateway_fixtures import PreloadedPool, live_server
from feedback.config import ServeConfig

# Cursors in the kind of code the tiny model was trained on (stdlib Python); greedy, one line, as the replay.
PREFIXES = ["import os\nimport ", "def main():\n    ", "class Foo:\n    def __init__(self", "for i in range(",
            "    return ", "if __name__ == ", "x = [", "from collections import ", "    def __repr__(self",
            "try:\n    import ", "    raise ValueError(", "with open(", "while True:\n    ", "print(",
            "    self.", "def _get(self, key"]
MAX_TOKENS, STOP, SUFFIX = 8, ("\n",), "\n\nx = 1\n"  # FIM at a cursor, as the replay and the editors


def _suggestions(backend) -> list[dict]:
    out = []
    for p in PREFIXES:
        c = backend.complete(GenRequest(p, suffix=SUFFIX, max_tokens=MAX_TOKENS, temperature=0.0, stop=STOP, logprobs=True)).choices[0]
        out.append({"prefix": p, "text": c.text, "logprob": c.logprob})
    return out


@pytest.fixture(scope="module")
def fitted(tiny_ct2_backend, tiny_model_dir):
    """A filter fitted on the tiny model's suggestions, labelled by a user who accepts the model's more confident
    half (so what the filter learns is checkable): the most and least confident prefixes, shown and hidden."""
    from rlhf.filter import fit

    sugg = [s for s in _suggestions(tiny_ct2_backend) if s["text"].strip()]
    assert len(sugg) >= 8, sugg
    median = sorted(s["logprob"] for s in sugg)[len(sugg) // 2]
    rows = [{**filter_input(s["prefix"], s["text"], s["logprob"], "python"), "accepted": s["logprob"] >= median,
             "accepted_chars": len(s["text"]) if s["logprob"] >= median else 0} for s in sugg]
    filt = fit(rows, cost=2.0, model_sha256=weights_hash(tiny_model_dir), seed=0)
    by_lp = sorted(sugg, key=lambda s: s["logprob"])
    shown = [s for s in by_lp if filt.show(filter_input(s["prefix"], s["text"], s["logprob"], "python"))]
    hidden = [s for s in by_lp if s not in shown]
    assert shown and hidden, (filt, by_lp)
    nothing = fit([{**r, "accepted": False, "accepted_chars": 0} for r in rows], cost=2.0,
                  model_sha256=weights_hash(tiny_model_dir), seed=0)
    return filt, shown[-1], hidden[0], nothing


@pytest.fixture(scope="module")
def filtered_gateway(tmp_path_factory, tiny_ct2_backend, tiny_ct2_model_dir, fitted):
    db = f"sqlite:///{tmp_path_factory.mktemp('filtered') / 'feedback.db'}"
    upgrade(db)
    factory = session_factory(db)
    with factory.begin() as s:
        store.register_model_version(s, "tiny-f", str(tiny_ct2_model_dir), state="all",
                                     suggestion_filter=fitted[0].to_json(), filter_source="test")
        store.register_model_version(s, "tiny-none", str(tiny_ct2_model_dir), state="staff",
                                     suggestion_filter=fitted[3].to_json(), filter_source="test")
        key = store.create_key(s, "alice")
        staff = store.create_key(s, "staff", staff=True)
    cfg = ServeConfig(db_url=db, suggestion_filter=True)
    from feedback.app import create_app

    app = create_app(cfg, backends=PreloadedPool(cfg, tiny_ct2_backend))
    with live_server(app) as url:
        yield url, {"Authorization": f"Bearer {key}"}, {"Authorization": f"Bearer {staff}"}, factory


def _rows(factory, rid):
    """The request's rows once completed: they are written (pending) before the reply and completed right
    after it (feedback/inflight.py), so a reader straight from the database may see them pending for a moment."""
    deadline = time.monotonic() + 10
    while True:
        with factory() as s:
            rows = s.scalars(select(Completion).where(Completion.request_id == rid)
                             .order_by(Completion.choice_index)).all()
        if time.monotonic() > deadline or all(r.status != ServeStatus.pending.value for r in rows):
            return rows
        time.sleep(0.02)


def test_both_engines_give_the_replays_mean_logprob(tiny_backend, tiny_ct2_backend, tiny_model_dir):
    """CTranslate2 and transformers return the same feature as the held-out replay's generate()
    (pipeline.eval.generate.mean_logprob over the tokens of the returned text)."""
    from pipeline.eval.generate import GenerationSettings, generate, load_model

    model, tok = load_model(tiny_model_dir, 1)
    prompts = [tiny_backend.prompts.text(p, SUFFIX, MAX_TOKENS) for p in PREFIXES[:6]]
    lps: list[float] = []
    texts = generate(model, tok, prompts, GenerationSettings(max_new_tokens=MAX_TOKENS, temperature=0.0, batch_size=1,
                                                             seed=0, stop=STOP), logprobs=lps)
    for p, text, lp in zip(PREFIXES, texts, lps):
        for backend in (tiny_backend, tiny_ct2_backend):
            c = backend.complete(GenRequest(p, suffix=SUFFIX, max_tokens=MAX_TOKENS, temperature=0.0, stop=STOP, logprobs=True)).choices[0]
            assert c.text == text and c.logprob == pytest.approx(lp, abs=1e-4), (backend, p)
    assert tiny_backend.complete(GenRequest("x", max_tokens=2, temperature=0.0)).choices[0].logprob is None


def test_the_gateway_shows_nothing_when_the_filter_predicts_a_reject(filtered_gateway, fitted):
    url, headers, staff, factory = filtered_gateway
    _, shown, hidden, _ = fitted
    body = {"model": "auto", "suffix": SUFFIX, "max_tokens": MAX_TOKENS, "temperature": 0, "stop": list(STOP), "language": "python"}
    r = httpx.post(f"{url}/v1/completions", json={**body, "prompt": hidden["prefix"]}, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == ""  # OpenAI's "nothing": an empty completion
    (row,) = _rows(factory, r.json()["id"])
    assert row.status == ServeStatus.filtered.value and row.completion == hidden["text"]  # logged, with what was hidden

    r = httpx.post(f"{url}/v1/completions", json={**body, "prompt": shown["prefix"]}, headers=headers, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == shown["text"]
    (row,) = _rows(factory, r.json()["id"])
    assert row.status == ServeStatus.served.value

    # Streamed: decided before the first byte (the filter needs the whole suggestion), one chunk per choice.
    r = httpx.post(f"{url}/v1/completions", json={**body, "prompt": hidden["prefix"], "stream": True, "n": 2},
                   headers=headers, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [line[len("data: "):] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert [c["choices"][0]["text"] for c in chunks] == ["", ""] and {c["choices"][0]["index"] for c in chunks} == {0, 1}
    assert [x.status for x in _rows(factory, chunks[0]["id"])] == [ServeStatus.filtered.value] * 2

    # Tabby's "nothing" is no choice at all. Staff are routed to the staff version, whose filter was fitted on
    # a replay where nothing was accepted: it hides everything.
    tabby = {"language": "python", "segments": {"prefix": shown["prefix"], "suffix": SUFFIX}}
    r = httpx.post(f"{url}/v1/completions", json=tabby, headers=staff, timeout=60)
    assert r.status_code == 200 and r.json()["choices"] == [], r.text
    (row,) = _rows(factory, r.json()["id"])
    assert row.status == ServeStatus.filtered.value and row.completion
    with factory() as s:
        assert store.get_version(s, "tiny-none").id == row.model_version_id

    # Analytics: filtered rows are counted as filtered, never as served or shown, whatever a client reports.
    rid = next(c.request_id for c in _all(factory) if c.status == ServeStatus.filtered.value)
    with factory.begin() as s:
        store.record_feedback(s, store.get_or_create_user(s, "alice"), [store.FeedbackInput(rid, FeedbackKind.rejected)])
    with factory() as s:
        cells = {c["model"]: c for c in acceptance(s, by_language=False)}
    assert {m: (c["served"], c["filtered"], c["decided"]) for m, c in cells.items()} == \
        {"tiny-f": (1, 3, 0), "tiny-none": (0, 1, 0)}  # the reject was on a filtered row: not counted
    assert cells["tiny-none"]["shown"] == 0


def _all(factory):
    with factory() as s:
        return s.scalars(select(Completion).order_by(Completion.id)).all()


def test_a_filter_for_other_weights_is_refused_at_registration_and_at_load(tmp_path, tiny_ct2_backend,
                                                                          tiny_ct2_model_dir, fitted):
    filt = fitted[0]
    other = {**filt.to_json(), "model_sha256": "0" * 64}
    db = f"sqlite:///{tmp_path / 'feedback.db'}"
    upgrade(db)
    factory = session_factory(db)
    with pytest.raises(store.StoreError, match=r"cannot register 'tiny-x' with this suggestion filter: suggestion "
                                               r"filter was fitted for weights 000000000000, but the model version "
                                               r"'tiny-x' in .* has weights [0-9a-f]{12}"):
        with factory.begin() as s:
            store.register_model_version(s, "tiny-x", str(tiny_ct2_model_dir), suggestion_filter=other)
    with pytest.raises(store.StoreError, match="missing coef"):
        with factory.begin() as s:
            store.register_model_version(s, "tiny-y", str(tiny_ct2_model_dir),
                                         suggestion_filter={k: v for k, v in other.items() if k != "coef"})
    # Weights that changed after registration (or a row written around the registry): refused when loaded.
    with factory.begin() as s:
        mv = store.register_model_version(s, "tiny-x", str(tiny_ct2_model_dir), state="all")
        mv.eval_results = {REGISTRY_KEY: {"filter": other}}
        key = store.create_key(s, "alice")
    cfg = ServeConfig(db_url=db, suggestion_filter=True)
    from feedback.app import create_app

    with live_server(create_app(cfg, backends=PreloadedPool(cfg, tiny_ct2_backend))) as url:
        r = httpx.post(f"{url}/v1/completions", json={"model": "auto", "prompt": "x = ", "max_tokens": 2},
                       headers={"Authorization": f"Bearer {key}"}, timeout=60)
        assert r.status_code == 502, r.text
        assert "model version 'tiny-x': suggestion filter was fitted for weights 000000000000" in r.json()["error"]["message"]
    assert _all(factory) == []  # nothing was served, nothing logged
    # With the switch off the same version serves unfiltered.
    cfg = ServeConfig(db_url=db, suggestion_filter=False)
    with live_server(create_app(cfg, backends=PreloadedPool(cfg, tiny_ct2_backend))) as url:
        r = httpx.post(f"{url}/v1/completions", json={"model": "auto", "prompt": "x = ", "max_tokens": 2},
                       headers={"Authorization": f"Bearer {key}"}, timeout=60)
        assert r.status_code == 200
    assert [c.status for c in _all(factory)] == [ServeStatus.served.value]  # completed after the reply


def test_models_register_takes_a_filter_only_for_its_weights(tmp_path, tiny_model_dir, fitted, capsys):
    from pipeline.cli import main as ownllm

    url = f"sqlite:///{tmp_path / 'cli.db'}"
    assert ownllm(["feedback", "migrate", "--db-url", url]) == 0
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(fitted[0].to_json()))
    bad.write_text(json.dumps({**fitted[0].to_json(), "model_sha256": "f" * 64}))
    capsys.readouterr()
    assert ownllm(["models", "register", str(tiny_model_dir), "--name", "v1", "--filter", str(bad), "--db-url", url]) == 2
    assert "suggestion filter was fitted for weights ffffffffffff" in capsys.readouterr().err
    assert ownllm(["models", "register", str(tiny_model_dir), "--name", "v1", "--filter", str(tmp_path / "no.json"),
                   "--db-url", url]) == 2
    assert "--filter" in capsys.readouterr().err
    assert ownllm(["models", "register", str(tiny_model_dir), "--name", "v1", "--filter", str(good), "--db-url", url]) == 0
    with session_factory(url)() as s:
        entry = store.get_version(s, "v1").eval_results[REGISTRY_KEY]
    assert entry["source"] == str(good) and entry["filter"]["model_sha256"] == weights_hash(tiny_model_dir)
