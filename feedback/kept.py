"""What the user kept at a cursor, derived from the editor's later requests for the same file.

An editor never says what its user typed after dismissing (or editing) a suggestion, but its next
completion requests do: a later request from the same user for the same file carries a prefix that runs
past the earlier cursor, and the text between is what is now written there. :func:`typed_at_cursor` reads
that text off two prefixes; :func:`derive_from_request` applies it to the user's earlier completions of the
file within ``feedback.derive_window_s`` and stores it as ``kept_text`` with ``kept_source = 'derived'``.

The rules, each guarding against a false derivation:
- the earlier cursor is found by its *anchor*, the last :data:`ANCHOR_CHARS` characters before it, in the
  later prefix (first occurrence: text before a cursor does not move when the user types after it). Editors
  send a window of lines (tabby-agent: 20 above the cursor), so a cursor that scrolled out of the later
  window gives nothing, never a guess;
- the user moved the cursor rather than typed when the text after the anchor is the earlier suffix itself
  (the cursor jumped down over existing lines): nothing is derived;
- only finished lines count (the user pressed Enter or left the line), up to as many lines as the suggestion
  had (at least one): the kept text is "up to the end of that line or statement", and a half-typed line is
  left for a later request to settle;
- the kept text stops at the earlier suffix's first non-blank line (the user typed, then walked on into
  existing code);
- a derived value is replaced by a later derivation within the window (the latest state of the line wins:
  an accepted suggestion the user then edited keeps the edit); ``typed`` and ``simulated`` provenances are
  never overwritten.
Hand-written because it is a few string rules specific to how editors window their requests; no library
does it.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from feedback.models import Completion, ServeStatus, User, utcnow

ANCHOR_CHARS = 200


def _first_nonblank_line(text: str) -> str | None:
    for line in text.split("\n"):
        if line.strip():
            return line.strip()
    return None


def typed_at_cursor(earlier_prefix: str, earlier_suffix: str | None, later_prefix: str,
                    max_lines: int = 1) -> str | None:
    """The finished text now written at the earlier cursor, or None when the later prefix does not tell.

    ``max_lines``: at most this many lines (counted from the first line with content) are kept.
    """
    anchor = earlier_prefix[-ANCHOR_CHARS:]
    if not anchor.strip():
        return None  # an empty or blank prefix does not locate a cursor
    at = later_prefix.find(anchor)
    if at < 0:
        return None
    typed = later_prefix[at + len(anchor):]
    if not typed:
        return None
    suffix = earlier_suffix or ""
    if suffix.startswith(typed) or (suffix.strip() and typed.startswith(suffix)):
        return None  # the cursor moved down over text that was already there
    common = os.path.commonprefix([typed, suffix])
    if "\n" in common and common[:common.rfind("\n")].strip():
        return None  # a whole existing line was passed over: a cursor jump, then typing elsewhere
    lines = typed.split("\n")
    if len(lines) < 2:
        return None  # the line is not finished yet
    finished = lines[:-1]  # the last element is the line still being typed (or empty after a newline)
    stop = _first_nonblank_line(suffix)
    kept: list[str] = []
    content = 0
    for line in finished:
        if stop is not None and kept and line.strip() == stop:
            break
        kept.append(line)
        if line.strip():
            content += 1
            if content >= max(1, max_lines):
                break
    while kept and not kept[-1].strip():
        kept.pop()
    text = "\n".join(kept)
    return text if text.strip() else None


def derive_from_request(s: Session, user: User, filepath: str | None, prefix: str, now: datetime,
                        window_s: float, exclude_request_id: str | None = None) -> int:
    """Set ``kept_text`` (derived) on the user's earlier completions of ``filepath`` that ``prefix`` runs past.

    Returns how many completion rows got a (new or updated) derived ``kept_text``. A user who stores no code
    text gets nothing derived (there is no earlier prompt text to compare, and no kept text may be stored).
    """
    if not filepath or not prefix or not getattr(user, "store_code", True):
        return 0
    since = now - timedelta(seconds=window_s)
    # A row still `pending` has no completion text yet (it is completed after its reply, maybe by another
    # process): a later request settles it.
    q = (select(Completion)
         .where(Completion.user_id == user.id, Completion.filepath == filepath, Completion.created_at >= since,
                Completion.created_at <= now, Completion.prompt.is_not(None),
                Completion.status != ServeStatus.pending.value,
                (Completion.kept_source.is_(None)) | (Completion.kept_source == "derived"))
         .order_by(Completion.created_at, Completion.id))
    if exclude_request_id is not None:
        q = q.where(Completion.request_id != exclude_request_id)
    changed = 0
    for row in s.scalars(q):
        n_lines = max(1, len([ln for ln in (row.completion or "").split("\n") if ln.strip()]))
        kept = typed_at_cursor(row.prompt, row.suffix, prefix, n_lines)
        if kept is None or (row.kept_source == "derived" and row.kept_text == kept):
            continue
        row.kept_text, row.kept_source, row.kept_at = kept, "derived", now
        changed += 1
    return changed


def settle_from_request(app_state, inp, user: User) -> int:
    """Before serving a request that names its file (Tabby's ``segments.filepath``, the OpenAI shape's
    ``filepath`` extension), let its prefix settle what the user kept at their earlier cursors in that file."""
    if not inp.filepath:
        return 0
    # This user's completions this process is still completing (after their replies) are settled first.
    app_state.service.inflight.wait(user_id=user.id, timeout=app_state.cfg.pending_feedback_wait_s)
    with app_state.factory.begin() as s:
        me = s.get(User, user.id)
        return derive_from_request(s, me, inp.filepath, inp.prefix, utcnow(), app_state.feedback_cfg.derive_window_s)
