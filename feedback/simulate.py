"""`ownllm feedback simulate`: a simulated IDE user closes the loop offline.

It replays the 'feedback' part of the held-out files (the validation split, ``records.split_of``, minus
the RLHF gate's own part, ``records.val_part_of``) through the HTTP API exactly as an editor plugin
would. At deterministic cursors (:func:`cursors`) — inside a line, after its indentation or after a word
or punctuation, never after a bare newline — it sends the text before the cursor as ``prompt`` and the
text after the cursor's line as ``suffix`` (FIM), and asks for ``choices`` suggestions (``n``, sampled
at ``temperature`` / ``top_p``; one greedy suggestion when ``choices`` is 1), cut at the end of the line.

The user knows what they are about to type: the rest of the line (``Cursor.kept``). They accept the
suggestion that saves them the most typing with editors' partial accept (:func:`accepted_length`: the
longest prefix that matches what they type, cut at a word boundary) if it holds at least
``min_accept_words`` whole words, and reject every other shown suggestion. Each event carries
``accepted_chars`` (partial accept) and ``kept_text`` (what the user really typed, ``kept_source``
``simulated``): the snapshot turns them into SFT examples on kept code and preference pairs (kept or
accepted vs rejected). It also posts demo bounties derived from held-out documented functions.

Typing mode (``typing``, on by default): the user does not report what they kept; they type it, and the
editor's next request (:func:`typed_on`: the cursor at the next line's indentation, naming the file) runs past
the earlier cursor, so the gateway derives ``kept_text`` (``kept_source`` ``derived``, feedback/kept.py) exactly
as it does for a real editor. That follow-up request asks for one token; its answer is not looked at.

Rounds (``--round R``): round R takes the next ``cursors_per_file`` cursors of each file
(:func:`cursor_candidates` orders them once), so no round reuses an earlier round's cursor line, and
feedback accumulates: round 0 replaces all earlier simulated traffic and posts the bounties; round R > 0
tags its requests (:func:`end_user`) and replaces only its own and later rounds' traffic, so a rerun of
round R (`dvc repro` after a change) leaves the store as a first run would.

Deterministic given params: files, cursors and users come from seeded choices; each request carries a
``seed`` derived from ``seed``, the round and the cursor index (:func:`cursor_seed`; the local backend
honours it), so a rerun leaves the same store and reports.
"""

from __future__ import annotations

import os
import random
import re
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from pipeline.cli import UserError
from feedback.config import FeedbackParams, SimulateConfig, load_feedback_params
from pipeline.fim_prompt import SPECIAL_TOKENS
from pipeline.tracking import say, stage_run

STAGE = "feedback/simulate"
SIM_USER_PREFIX = "sim-user-"


@dataclass(frozen=True)
class Cursor:
    """Where the simulated user stops typing and waits for a suggestion, and what they type next.

    The cursor sits inside a line: after its indentation or at the end of a word / punctuation run, never
    after a bare newline (BPE merges a newline with the indentation after it, so a prompt ending in one is
    a token boundary the model rarely saw) and never after a blank (same: " x" is one token)."""

    doc_id: str
    path: str
    lang: str
    line_no: int  # 0-based
    col: int  # characters of the line before the cursor
    prefix: str  # the file up to the cursor (its end, up to max_context_chars)
    suffix: str  # the file after the cursor's line, starting with its newline (its start, up to max_context_chars)
    kept: str  # the real continuation: the rest of the cursor's line, what the user goes on to type

    @property
    def key(self) -> str:
        return f"{self.doc_id}:{self.line_no}:{self.col}"


def _word(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


def cursor_columns(line: str, min_kept_chars: int) -> list[int]:
    """Columns of ``line`` where an editor would ask for a completion, leaving at least ``min_kept_chars``
    non-blank characters to type: after the indentation (indented lines only: column 0 of an unindented
    line is right after a bare newline), and after every non-blank character that does not sit inside a
    word (``return|``, ``self.|``, ``foo(|``) and is not followed by more of the same word."""
    indent = len(line) - len(line.lstrip(" \t"))
    cols = [indent] if indent > 0 else []
    for j in range(indent + 1, len(line)):
        prev, nxt = line[j - 1], line[j]
        if prev.isspace() or (_word(prev) and _word(nxt)):
            continue
        cols.append(j)
    return [j for j in cols if sum(not c.isspace() for c in line[j:]) >= min_kept_chars]


def cursor_candidates(doc: dict, cfg: SimulateConfig) -> list[tuple[int, int]]:
    """Every (line, column) a cursor may take in the document, in a seeded order fixed by the document id.

    Lines come after a little context (line 3 on); one column per line (seeded), so a long line does
    not weigh more than a short one. The order is the same for every round: round ``r`` takes the next
    ``cursors_per_file`` candidates (:func:`cursors`), so rounds never reuse a cursor line."""
    lines = doc["content"].split("\n")
    rng = random.Random(f"{cfg.seed}:{doc['id']}")
    out = []
    for i in range(3, len(lines)):
        if len(lines[i].strip()) < cfg.min_line_chars:
            continue
        cols = cursor_columns(lines[i], cfg.min_kept_chars)
        if cols:
            out.append((i, cols[rng.randrange(len(cols))]))
    rng.shuffle(out)
    return out


def make_cursor(doc: dict, line_no: int, col: int, max_context_chars: int) -> Cursor:
    lines = doc["content"].split("\n")
    prefix = "".join(line + "\n" for line in lines[:line_no]) + lines[line_no][:col]
    suffix = "\n" + "\n".join(lines[line_no + 1:])
    return Cursor(doc["id"], doc.get("path", ""), doc["lang"], line_no, col, prefix[-max_context_chars:],
                  suffix[:max_context_chars], lines[line_no][col:])


def cursors(doc: dict, cfg: SimulateConfig, round_no: int = 0, per_file: int | None = None) -> list[Cursor]:
    """Round ``round_no``'s cursors of a document (``per_file`` of them, default ``cfg.cursors_per_file``):
    disjoint from every other round's, in line order."""
    k = cfg.cursors_per_file if per_file is None else per_file
    picks = sorted(cursor_candidates(doc, cfg)[round_no * k:(round_no + 1) * k])
    return [make_cursor(doc, i, j, cfg.max_context_chars) for i, j in picks]


def accepted_length(suggestion: str, kept: str) -> int:
    """Characters of ``suggestion`` a user typing ``kept`` accepts, as editors' partial accept does
    (accept next word / accept line): the longest common prefix, cut back to a word boundary of ``kept``
    (its end, or a place that is not inside a word). A suggestion that goes on past the line is accepted up
    to the end of the line."""
    n = len(os.path.commonprefix([suggestion, kept]))
    while 0 < n < len(kept) and _word(kept[n - 1]) and _word(kept[n]):
        n -= 1
    return n if kept[:n].strip() else 0  # blanks alone are not worth a keystroke


def words_in(text: str) -> int:
    return len(re.findall(r"\w+", text))


def is_accepted(suggestion: str, kept: str, min_words: int) -> int:
    """Accepted characters (0 = rejected): a suggestion counts as accepted when its accepted part holds
    at least ``min_words`` whole words (``feedback.simulate.min_accept_words``)."""
    n = accepted_length(suggestion, kept)
    return n if n and words_in(kept[:n]) >= min_words else 0


def decide(texts: list[str], kept: str, min_words: int) -> list[tuple[str, int] | None]:
    """The user's event per suggestion, ``(event, accepted_chars)``: the one that saves the most typing
    (lowest index on ties) is accepted if it passes :func:`is_accepted`, every other shown one rejected;
    empty suggestions are not shown, so they get no event; nor does a duplicate of the accepted text (an
    IDE shows identical suggestions once), so the same text is never both accepted and rejected."""
    if not texts:
        return []
    gains = [is_accepted(t, kept, min_words) for t in texts]
    best = max(range(len(texts)), key=lambda i: (gains[i], -i))
    out: list[tuple[str, int] | None] = []
    for i, t in enumerate(texts):
        if not t.strip():
            out.append(None)
        elif gains[best] and i == best:
            out.append(("accepted", gains[i]))
        elif gains[best] and t == texts[best]:
            out.append(None)
        else:
            out.append(("rejected", 0))
    return out


def where(case: Cursor) -> dict:
    """The file the cursor is in, as an editor names it (the ``filepath`` request field): kept_text is derived
    per user and file (feedback/kept.py)."""
    return {"filepath": (case.path or case.doc_id)[:1024]}


def typed_on(case: Cursor, max_context_chars: int) -> tuple[str, str]:
    """The editor's next request after the user typed the rest of the line and pressed Enter: the cursor at
    the next line's indentation. Its prefix runs past the earlier cursor by exactly what the user kept, so
    the gateway derives ``kept_text`` from it (typing mode)."""
    rest = case.suffix[1:] if case.suffix.startswith("\n") else case.suffix
    indent = rest[:len(rest) - len(rest.lstrip(" \t"))]
    prefix = case.prefix + case.kept + "\n" + indent
    return prefix[-max_context_chars:], rest[len(indent):]


def cursor_seed(seed: int, index: int) -> int:
    """The sampling seed of the ``index``-th cursor's request: reruns draw the same suggestions."""
    return (seed * 1_000_003 + index) % 2**31


def pick_files(docs: list[dict], cfg: SimulateConfig) -> list[dict]:
    """``cfg.files`` documents, round-robin over languages (so every language gets traffic), seeded."""
    by_lang: dict[str, list[dict]] = defaultdict(list)
    for d in docs:
        if d["content"].count("\n") >= 4 and not any(t in d["content"] for t in SPECIAL_TOKENS):
            by_lang[d["lang"]].append(d)
    for lang, group in by_lang.items():
        random.Random(f"{cfg.seed}:{lang}").shuffle(group)
    out, langs = [], sorted(by_lang)
    while len(out) < cfg.files and any(by_lang[lang] for lang in langs):
        for lang in langs:
            if by_lang[lang] and len(out) < cfg.files:
                out.append(by_lang[lang].pop())
    return out


def reset_simulated(s) -> dict[str, int]:
    """Remove the previous run's simulated traffic (its users' completions, feedback, keys; derived bounties)."""
    from sqlalchemy import delete, select

    from feedback.models import ApiKey, Bounty, Completion, FeedbackEvent, User

    ids = list(s.scalars(select(User.id).where(User.name.startswith(SIM_USER_PREFIX))))
    comp = select(Completion.id).where(Completion.user_id.in_(ids))
    n_fb = s.execute(delete(FeedbackEvent).where(FeedbackEvent.completion_id.in_(comp))).rowcount
    n_comp = s.execute(delete(Completion).where(Completion.user_id.in_(ids))).rowcount
    s.execute(delete(ApiKey).where(ApiKey.user_id.in_(ids)))
    n_b = s.execute(delete(Bounty).where(Bounty.source == "derived")).rowcount
    return {"completions": n_comp, "feedback_events": n_fb, "bounties": n_b}


ROUND_TAG = "/round-"


def end_user(user: str, round_no: int) -> str:
    """The OpenAI ``user`` field of a simulated request: the editor, and the round for rounds after the first
    (so a rerun of round R can replace its own traffic, and that of later rounds, and nothing else)."""
    return f"{user}/ide" + (f"{ROUND_TAG}{round_no}" if round_no else "")


def reset_rounds_from(s, round_no: int) -> dict[str, int]:
    """Remove simulated traffic of round ``round_no`` and later (a rerun of a round, as `dvc repro` does when
    round R changed, must not find its previous run's requests, nor those of the rounds after it)."""
    from sqlalchemy import delete, select

    from feedback.models import Completion, FeedbackEvent, User

    rows = s.execute(select(Completion.id, Completion.end_user).join(User, User.id == Completion.user_id)
                     .where(User.name.startswith(SIM_USER_PREFIX), Completion.end_user.contains(ROUND_TAG))).all()
    ids = [i for i, who in rows if int(who.rsplit(ROUND_TAG, 1)[1]) >= round_no]
    n_fb = n_comp = 0
    for k in range(0, len(ids), 500):  # bounded IN lists
        chunk = ids[k:k + 500]
        n_fb += s.execute(delete(FeedbackEvent).where(FeedbackEvent.completion_id.in_(chunk))).rowcount
        n_comp += s.execute(delete(Completion).where(Completion.id.in_(chunk))).rowcount
    return {"completions": n_comp, "feedback_events": n_fb} if n_comp else {}


def derived_bounties(docs: list[dict], limit: int):
    from feedback.bounties import derive

    out = []
    for d in docs:  # canonical (lang, id) order: the same bounties on every run
        if d["lang"] != "python" or len(out) >= limit:
            continue
        out.extend(derive(d.get("path") or d["id"], d["content"])[: limit - len(out)])
    return out


def _rate(acc: int, n: int) -> dict:
    from feedback.analytics import wilson

    lo, hi = wilson(acc, n)
    return {"accepted": acc, "decided": n, "rate": acc / n if n else None, "ci95": [lo, hi]}


def simulate(params: FeedbackParams, db_url: str, round_no: int = 0) -> dict:
    import httpx

    from feedback import store
    from feedback.app import create_app, serve_in_thread
    from feedback.commands import ensure_model_registered, write_report
    from feedback.db import session_factory, upgrade
    from pipeline.eval.fim import validation_docs

    cfg = params.feedback.simulate
    try:
        # The 'feedback' part of the validation split only: the 'gate' part is the RLHF gate's held-out set.
        # Its size is the gate's parameter (rlhf.gate.heldout_frac, in the composed params; this package
        # cannot import rlhf's schema, only read the value the gate also reads).
        docs = validation_docs(params, columns=("id", "lang", "path", "content"), part="feedback",
                               gate_frac=params.rlhf.gate.heldout_frac)
    except FileNotFoundError as exc:
        raise UserError(str(exc)) from None
    files = pick_files(docs, cfg)
    cases = [c for d in files for c in cursors(d, cfg, round_no)]
    if not cases:
        raise UserError(f"no held-out files to replay in {params.data.dedup.out} (validation split "
                        f"shards.val_frac={params.shards.val_frac} is empty or has no usable lines)")
    bounties = derived_bounties(docs, cfg.bounties)

    upgrade(db_url)  # the simulator owns its store's schema: bring it to head
    factory = session_factory(db_url)
    name, created = ensure_model_registered(factory, params.serve.model_dir, cfg.model_name)
    users = [f"{SIM_USER_PREFIX}{i}" for i in range(cfg.users)]
    with factory.begin() as s:
        removed = (reset_simulated(s) if round_no == 0 else reset_rounds_from(s, round_no)) if cfg.reset else {}
        keys = {u: store.create_key(s, u, staff=False) for u in users}

    serve_cfg = params.serve.model_copy(update={"db_url": db_url, "host": "127.0.0.1"})
    app = create_app(serve_cfg)
    tally: dict[tuple[str, str], Counter] = defaultdict(Counter)
    events: Counter = Counter()
    sampling = {"temperature": cfg.temperature, "top_p": cfg.top_p} if cfg.choices > 1 else {"temperature": 0}
    added = accepted_chars = kept_chars = follow_ups = 0
    with serve_in_thread(app) as url:
        clients = {u: httpx.Client(base_url=url + "/v1", headers={"Authorization": f"Bearer {k}"}, timeout=300)
                   for u, k in keys.items()}
        try:
            for i, case in enumerate(tqdm(cases, desc="simulated IDE user", unit="cursor", file=sys.stderr)):
                user = users[i % len(users)]
                client = clients[user]
                r = client.post("/completions", json={
                    "model": "auto", "prompt": case.prefix, "suffix": case.suffix, "max_tokens": cfg.max_tokens,
                    "n": cfg.choices, **sampling, "seed": cursor_seed(cfg.seed + 7919 * round_no, i),
                    "language": case.lang, "stop": ["\n"], "user": end_user(user, round_no), **where(case)})
                _check(r, "completion")
                body = r.json()
                texts = [c["text"] for c in sorted(body["choices"], key=lambda c: c["index"])]
                decisions = decide(texts, case.kept, cfg.min_accept_words)
                # Decision time: a deterministic stand-in for reading the suggestions (about 30 ms per character).
                # Every shown suggestion's event carries what the user really typed at the cursor (kept_text).
                # Typing mode: the user does not say what they kept; they type it, and the gateway reads it off
                # the editor's next request (below).
                kept = {} if cfg.typing else {"kept_text": case.kept, "kept_source": "simulated"}
                batch = [{"id": body["id"], "index": k, "event": ev[0], "time_to_decision_ms": 400.0 + 30.0 * len(texts[k]),
                          **kept, **({"accepted_chars": ev[1]} if ev[0] == "accepted" else {})}
                         for k, ev in enumerate(decisions) if ev is not None]
                if batch:
                    _check(client.post("/feedback", json={"events": batch}), "feedback")
                if cfg.typing:
                    prefix, suffix = typed_on(case, cfg.max_context_chars)
                    r = client.post("/completions", json={
                        "model": "auto", "prompt": prefix, "suffix": suffix, "max_tokens": 1, "temperature": 0,
                        "language": case.lang, "user": end_user(user, round_no), **where(case)})
                    _check(r, "follow-up completion")
                    follow_ups += 1
                events.update(ev[0] for ev in decisions if ev is not None)
                accepted_chars += sum(ev[1] for ev in decisions if ev is not None)
                kept_chars += len(case.kept)
                outcome = "accepted" if any(ev and ev[0] == "accepted" for ev in decisions) else "rejected"
                tally[(body["model"], case.lang)][outcome] += 1
            for b in (bounties if round_no == 0 else []):
                r = clients[users[0]].post("/bounties", json={**b.as_dict(), "source": "derived"})
                _check(r, "bounty")
                added += r.json()["created"]
        finally:
            for c in clients.values():
                c.close()

    # Run-dependent facts go to the console, not the metrics file (which must hash the same on every rerun).
    if created:
        say(f"[feedback simulate] registered {params.serve.model_dir} as model version {name!r}")
    if removed:
        say(f"[feedback simulate] replaced the previous simulated traffic: {removed}")
    # A folder of its own: `ownllm feedback report` (a rolling window, run by operators) writes the parent
    # folder and must not overwrite this stage's DVC-tracked report of the whole simulated traffic.
    rep = write_report(factory, Path(params.feedback.reports_dir) / "simulated", None, None, params, {"all": True})
    by_lang: dict[str, Counter] = defaultdict(Counter)
    for (_, lang), c in tally.items():
        by_lang[lang].update(c)
    acc = sum(c["accepted"] for c in tally.values())
    return {
        "round": round_no, "files": len(files), "cursors": len(cases), "users": cfg.users, "choices": cfg.choices,
        "typing": cfg.typing, "follow_up_requests": follow_ups,
        "accepted_chars": accepted_chars, "completed_share": accepted_chars / kept_chars if kept_chars else 0.0,
        "model": name,
        # Per choice: one accepted choice and its rejected alternatives at a cursor make preference pairs.
        "choice_events": {"accepted": events["accepted"], "rejected": events["rejected"]},
        **_rate(acc, len(cases)),
        "by_language": {lang: _rate(c["accepted"], c["accepted"] + c["rejected"]) for lang, c in sorted(by_lang.items())},
        "by_model": {m: _rate(c["accepted"], c["accepted"] + c["rejected"])
                     for m, c in sorted(_by_model(tally).items())},
        "bounties": {"derived": len(bounties), "added": added},
        "ab_experiments": [{k: e.get(k) for k in ("experiment", "verdict", "p_value")} for e in rep["experiments"]],
    }


def _by_model(tally) -> dict[str, Counter]:
    out: dict[str, Counter] = defaultdict(Counter)
    for (model, _), c in tally.items():
        out[model].update(c)
    return out


def _check(r, what: str) -> None:
    if r.status_code >= 400:
        try:
            msg = r.json()["error"]["message"]
        except Exception:
            msg = r.text[:200]
        raise UserError(f"the gateway refused a simulated {what}: HTTP {r.status_code}: {msg}")


def main(args) -> int:
    from pipeline import numerics

    params = load_feedback_params(args.params)
    numerics.apply(params.numerics)  # the simulated users' completions come from the model
    db_url = args.db_url or params.serve.db_url
    with stage_run(STAGE, params) as run:
        summary = simulate(params, db_url, getattr(args, "round", 0) or 0)
        run.summary(summary)
    rate = "-" if summary["rate"] is None else f"{summary['rate']:.1%}"
    ev = summary["choice_events"]
    say(f"[feedback simulate] {summary['cursors']} cursors x {summary['choices']} suggestions on {summary['files']} "
        f"held-out files by {summary['users']} users: {ev['accepted']} suggestions accepted, {ev['rejected']} "
        f"rejected; {summary['accepted']} cursors accepted one ({rate}, 95% CI "
        f"{summary['ci95'][0]:.1%}-{summary['ci95'][1]:.1%}); {summary['bounties']['added']} bounties added "
        f"→ {params.tracking.reports_dir}/{STAGE}.json")
    return 0
