"""`ownllm rlhf snapshot`: the feedback store → versioned TRL datasets under ``data/feedback/``.

Three JSONL files, each in the column format its TRL trainer documents:

- ``sft.jsonl``       bounties (instruction + accepted solution) and what users kept at their cursors, as
                      ``prompt`` / ``completion`` (``source`` bounty | kept; a kept row says where the text came
                      from, ``kept_sources``, and whether the user was shown a suggestion there, ``shown``);
- ``pairs.jsonl``     completions served for the same context, one accepted and one rejected, as
                      ``prompt`` / ``chosen`` / ``rejected`` (DPO);
- ``unpaired.jsonl``  every decided completion as ``prompt`` / ``completion`` / ``label`` (KTO).

The text goes through the data pipeline's own steps before it is written: PII redaction
(``pipeline.data.steps.pii.redact_pii``), exact + MinHash near-duplicate removal
(``pipeline.data.dedup.dedup_table``) and benchmark decontamination (``pipeline.data.decontam``), so the
tuning data obeys the same rules as the pretraining data. Dropped examples go to
``data/feedback/rejected.parquet`` with their reason.

Determinism: row ids are content hashes and every file is sorted by id, so the snapshot of a given
database state is byte-identical however the rows were inserted. ``manifest.json`` holds the counts and
``content_hash`` (sha256 of the three files), which the refresh job compares to decide "nothing new".
``parent.json`` names the model tuning starts from (:func:`snapshot_parent`): under `dvc repro` (round 1 of the
pipeline) the base model ``rlhf.base_model``, so the outputs depend only on what DVC tracks; for `ownllm rlhf
refresh` (the production path, :data:`PARENT_FROM_ENV` = ``production``) the version serving everyone.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
from sqlalchemy import select
from sqlalchemy.orm import Session

from rlhf.config import RLHFParams
from pipeline.data.dedup import dedup_table
from pipeline.data.records import DOC_SCHEMA, REJECT_SCHEMA, make_doc, to_table, write_rejected
from pipeline.data.steps.pii import redact_pii
from rlhf.tune import PAIRS_FILE, PARENT_FILE, SFT_FILE, UNPAIRED_FILE

MANIFEST_FILE = "manifest.json"
REJECTED_FILE = "rejected.parquet"
STAGE = "rlhf_snapshot"
# Line-comment syntax per language, to render a bounty's instruction as code the model can continue.
COMMENT = {"python": "#", "shell": "#", "ruby": "#", "javascript": "//", "typescript": "//", "c": "//",
           "cpp": "//", "java": "//", "go": "//", "rust": "//"}


@dataclass(frozen=True)
class Decision:
    """A served completion with its accept/reject decision (texts as the store holds them)."""

    language: str
    prefix: str
    suffix: str
    completion: str
    accepted: bool
    kept: str | None = None  # what the user really kept at the cursor (Completion.kept_text), when known
    kept_source: str | None = None  # typed | derived | simulated (Completion.kept_source)


@dataclass(frozen=True)
class UnseenKept:
    """What the user kept at a cursor where they were shown nothing: the suggestion filter hid it (``filtered``)
    or it was empty (``served``, no feedback event). The kept text is still what they wrote there; the hidden
    suggestion itself is not training data (the user never judged it)."""

    language: str
    prefix: str
    suffix: str
    kept: str
    kept_source: str | None = None


@dataclass(frozen=True)
class BountyText:
    title: str
    instruction: str
    language: str
    solution: str


@dataclass
class Snapshot:
    sft: list[dict]
    pairs: list[dict]
    unpaired: list[dict]
    rejected: pa.Table
    stats: dict = field(default_factory=dict)

    def files(self) -> dict[str, bytes]:
        return {SFT_FILE: jsonl(self.sft), PAIRS_FILE: jsonl(self.pairs), UNPAIRED_FILE: jsonl(self.unpaired)}

    @property
    def content_hash(self) -> str:
        h = hashlib.sha256()
        for name, data in sorted(self.files().items()):
            h.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
        return h.hexdigest()


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def row_id(*parts: str) -> str:
    h = hashlib.blake2b(digest_size=8, person=b"ownllm-rlhf")
    for p in parts:
        h.update(p.encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ the store
def load_store(session: Session) -> tuple[list[Decision], list[BountyText], int]:
    """Decided completions that were served and whose texts are still retained, and all bounties; plus how many
    were purged. A pending, disconnected or failed row was not shown whole, so its decision teaches nothing."""
    from feedback.models import Bounty, Completion, FeedbackEvent, FeedbackKind, ServeStatus

    rows = session.execute(
        select(Completion.language, Completion.prompt, Completion.suffix, Completion.completion, FeedbackEvent.kind,
               Completion.kept_text, Completion.kept_source)
        .join(FeedbackEvent, FeedbackEvent.completion_id == Completion.id)
        .where(Completion.status == ServeStatus.served.value)
        .order_by(Completion.id)
    ).all()
    decisions, purged = [], 0
    for lang, prompt, suffix, completion, kind, kept, kept_source in rows:
        if prompt is None or completion is None:  # texts removed by the retention purge: counts only
            purged += 1
            continue
        decisions.append(Decision(lang or "unknown", prompt, suffix or "", completion, kind == FeedbackKind.accepted,
                                  kept, kept_source))
    bounties = [BountyText(b.title, b.instruction, b.language, b.solution)
                for b in session.scalars(select(Bounty).order_by(Bounty.content_hash))]
    return decisions, bounties, purged


# Where round 1's parent comes from: ``base`` (default: `dvc repro`, whose outputs must not depend on what an earlier
# run left in the live store) or ``production`` (the version serving everyone, what `ownllm rlhf refresh` tunes from;
# it sets this variable for the `dvc exp run` it starts, whose stages run the same `ownllm rlhf snapshot`).
PARENT_FROM_ENV = "OWNLLM_RLHF_PARENT"
PARENT_FROM = ("base", "production")


def snapshot_parent(session: Session, base_model: str, parent_from: str) -> dict:
    """The model round 1 tunes from: ``production`` → :func:`production_parent`; ``base`` → ``base_model``, named
    as the store registered that folder (the simulated users' ``base``), whatever version serves everyone now."""
    if parent_from == "production":
        return production_parent(session, base_model)
    if parent_from != "base":
        raise ValueError(f"parent {parent_from!r}: expected one of {list(PARENT_FROM)}")
    from feedback.models import ModelVersion

    want = str(Path(base_model).resolve())
    name = session.scalar(select(ModelVersion.name).where(ModelVersion.path == want).order_by(ModelVersion.id).limit(1))
    return {"version": name, "model_dir": portable_path(base_model)}


def load_unseen_kept(session: Session) -> list[UnseenKept]:
    """Kept text at cursors where the user was shown nothing (:class:`UnseenKept`): rows the suggestion filter hid,
    and served rows without a feedback event (an empty suggestion is not shown). With the filter on, most rows
    are such: the user types the code anyway, and the gateway derives it (feedback/kept.py) or the client reports
    it. The privacy rules hold by the query: a user who stores no code has no prompt text (and nothing derived),
    a purged row has neither prompt nor kept text, and the snapshot redacts what it reads as for decisions.
    Acceptance analytics are not touched: they count served rows only."""
    from sqlalchemy import and_, or_

    from feedback.models import Completion, FeedbackEvent, ServeStatus

    rows = session.execute(
        select(Completion.language, Completion.prompt, Completion.suffix, Completion.kept_text, Completion.kept_source)
        .outerjoin(FeedbackEvent, FeedbackEvent.completion_id == Completion.id)
        .where(Completion.kept_text.is_not(None), Completion.prompt.is_not(None),
               or_(Completion.status == ServeStatus.filtered.value,
                   and_(Completion.status == ServeStatus.served.value, FeedbackEvent.id.is_(None))))
        .order_by(Completion.id)
    ).all()
    return [UnseenKept(lang or "unknown", prompt, suffix or "", kept, source)
            for lang, prompt, suffix, kept, source in rows]


def production_parent(session: Session, base_model: str) -> dict:
    """The version serving everyone (tuning starts from it), or the base model when none is registered."""
    from feedback.store import current_all

    mv = current_all(session)
    if mv is None:
        return {"version": None, "model_dir": base_model}
    from feedback.suggestion_filter import REGISTRY_KEY

    parent = {"version": mv.name, "model_dir": portable_path(mv.path)}
    filt = (mv.eval_results or {}).get(REGISTRY_KEY) if isinstance(mv.eval_results, dict) else None
    # The gate compares the tuned version with what users had: the parent with the filter it serves with.
    return {**parent, "filter": filt.get("filter", filt)} if filt else parent


def portable_path(path: str) -> str:
    """The registry stores absolute paths; a path inside the working directory (the repo, where DVC runs the
    stages) is written relative to it, so another clone reproduces the snapshot byte for byte."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


# ---------------------------------------------------------------------------------------- rendering
def render_prompt(prefix: str, suffix: str, max_chars: int) -> str:
    """The prompt exactly as the gateway builds it: plain prefix, or PSM fill-in-the-middle with a suffix.

    Long contexts keep the prefix's end and the suffix's start (the text next to the cursor); tuning fits the
    prompt to the model's context in tokens with the same builder as the gateway (rlhf/tune.py fit_prompts).
    """
    from pipeline.fim_prompt import fim_text

    prefix = prefix[-max_chars:]
    if not suffix:
        return prefix
    return fim_text(prefix, suffix[: max(0, max_chars // 3)])


def render_bounty(b: BountyText, max_chars: int) -> str:
    """An instruction as a comment block in the bounty's language, ending where the solution starts."""
    mark = COMMENT.get(b.language, "#")
    lines = [b.title.strip()] + b.instruction.strip().splitlines()
    text = "".join(f"{mark} {line}".rstrip() + "\n" for line in lines if line is not None)
    return text[-max_chars:]


# ------------------------------------------------------------------------------------- the snapshot
@dataclass
class _Context:
    language: str
    prefix: str
    suffix: str
    accepted: set[str] = field(default_factory=set)
    rejected: set[str] = field(default_factory=set)
    kept: set[str] = field(default_factory=set)  # what the user really kept here (usually one text)
    kept_sources: dict[str, set[str]] = field(default_factory=dict)  # kept text -> typed | derived | simulated
    shown: bool = False  # a suggestion was shown here and decided (not only hidden or empty ones)

    def add_kept(self, text: str, source: str | None) -> None:
        self.kept.add(text)
        self.kept_sources.setdefault(text, set()).add(source or "typed")


def _redact(text: str, params: RLHFParams, counts: Counter) -> str:
    red = redact_pii(text, params.data.clean.pii)
    counts.update({k: v for k, v in red.counts.items() if v})
    return red.text


def build_snapshot(decisions: list[Decision], bounties: list[BountyText], params: RLHFParams,
                   decontaminator=None, unseen_kept: list[UnseenKept] = ()) -> Snapshot:
    """Turn store rows into the three datasets (pure function of its inputs; order of inputs is irrelevant).

    ``unseen_kept`` (:func:`load_unseen_kept`) adds SFT-on-kept rows at cursors where nothing was shown; the
    preference data (pairs, unpaired) stays on suggestions the user saw and decided (docs/RLHF.md)."""
    cfg = params.rlhf
    pii: Counter = Counter()
    stats: Counter = Counter(decisions_in=len(decisions), bounties_in=len(bounties), unseen_kept_in=len(unseen_kept))

    # Contexts: the same (redacted) prefix + suffix is one context, whoever was served it.
    contexts: dict[tuple[str, str], _Context] = {}
    for d in decisions:
        prefix, suffix = _redact(d.prefix, params, pii), _redact(d.suffix, params, pii)
        completion = _redact(d.completion, params, pii)
        if not completion.strip():
            stats["empty_completion"] += 1
            continue
        ctx = contexts.setdefault((prefix, suffix), _Context(d.language, prefix, suffix))
        (ctx.accepted if d.accepted else ctx.rejected).add(completion)
        ctx.shown = True
        if d.kept is not None and d.kept.strip():
            ctx.add_kept(_redact(d.kept, params, pii), d.kept_source)
    for u in unseen_kept:  # nothing shown here: the kept text alone (an SFT row), never a preference
        if not u.kept.strip():
            continue
        prefix, suffix = _redact(u.prefix, params, pii), _redact(u.suffix, params, pii)
        ctx = contexts.setdefault((prefix, suffix), _Context(u.language, prefix, suffix))
        ctx.add_kept(_redact(u.kept, params, pii), u.kept_source)
    for ctx in contexts.values():  # the same text both accepted and rejected teaches nothing: drop it
        both = ctx.accepted & ctx.rejected
        stats["conflicting_label"] += len(both)
        ctx.accepted -= both
        ctx.rejected -= both
        ctx.rejected -= ctx.kept  # a rejected suggestion equal to what was kept was rejected for timing, not text

    # Documents in the pipeline's record schema, so its dedup and decontamination run on them unchanged.
    # A context's document is its rendered prompt (what the model is tuned on, not the whole file above the
    # cursor: two cursors in one file share that) plus its completions.
    ctx_docs = {}
    for ctx in contexts.values():
        cid = row_id("context", ctx.prefix, ctx.suffix)
        body = render_prompt(ctx.prefix, ctx.suffix, cfg.max_prompt_chars) + \
            "".join(sorted(ctx.accepted | ctx.rejected | ctx.kept))
        ctx_docs[cid] = (_doc("feedback", cid, ctx.language, body), ctx)
    sft_docs = {}
    for b in bounties:
        title, instruction = _redact(b.title, params, pii), _redact(b.instruction, params, pii)
        prompt = render_bounty(BountyText(title, instruction, b.language, ""), cfg.max_prompt_chars)
        completion = _redact(b.solution, params, pii)
        # Dedup/decontaminate the raw text: comment markers would hide a pasted benchmark prompt's n-grams.
        raw = f"{title}\n{instruction}\n{completion}"
        sid = row_id("sft", prompt, completion)
        sft_docs[sid] = (_doc("bounty", sid, b.language, raw), prompt, completion, b.language)

    rejected = []
    keep_ctx, rej = _filter_docs([d for d, _ in ctx_docs.values()], params, decontaminator)
    rejected.append(rej)
    keep_sft, rej = _filter_docs([v[0] for v in sft_docs.values()], params, decontaminator)
    rejected.append(rej)

    sft = [{"id": sid, "prompt": p, "completion": c, "language": lang, "source": "bounty"}
           for sid, (_, p, c, lang) in sft_docs.items() if sid in keep_sft and cfg.sft_bounties]
    pairs, unpaired = [], []
    for cid, (_, ctx) in ctx_docs.items():
        if cid not in keep_ctx:
            continue
        prompt = render_prompt(ctx.prefix, ctx.suffix, cfg.max_prompt_chars)
        if cfg.sft_kept:  # SFT on kept code: the cursor's FIM prompt -> what the user really kept there
            sft += [{"id": row_id("sft-kept", prompt, k), "prompt": prompt, "completion": k, "language": ctx.language,
                     "source": "kept", "kept_sources": sorted(ctx.kept_sources[k]), "shown": ctx.shown}
                    for k in sorted(ctx.kept)]
        # Preferences at the same cursor: chosen = what was kept (params: and/or the accepted suggestion).
        chosen = (ctx.kept if cfg.chosen in ("kept", "both") else set()) | \
            (ctx.accepted if cfg.chosen in ("accepted", "both") or not ctx.kept else set())
        ctx_pairs = sorted(
            ({"id": row_id("pair", prompt, a, r), "context_id": cid, "prompt": prompt, "chosen": a, "rejected": r,
              "language": ctx.language} for a in chosen for r in ctx.rejected if a != r),
            key=lambda x: x["id"])
        pairs += ctx_pairs[: cfg.max_pairs_per_context]  # a busy context must not dominate the preferences
        unpaired += [{"id": row_id("unpaired", prompt, c, str(label)), "context_id": cid, "prompt": prompt,
                      "completion": c, "label": label, "language": ctx.language}
                     for label, texts in ((True, ctx.accepted), (False, ctx.rejected)) for c in texts]
    rej_table = pa.concat_tables(rejected) if rejected else REJECT_SCHEMA.empty_table()
    stats.update(contexts=len(contexts), sft=len(sft), pairs=len(pairs), unpaired=len(unpaired),
                 unpaired_accepted=sum(r["label"] for r in unpaired),
                 sft_kept=sum(r["source"] == "kept" for r in sft),
                 sft_kept_unshown=sum(r["source"] == "kept" and not r["shown"] for r in sft),
                 contexts_with_kept=sum(bool(c.kept) for c in contexts.values()))
    out_stats = dict(sorted(stats.items()))
    out_stats["pii_redactions"] = dict(sorted(pii.items()))
    out_stats["rejected"] = dict(sorted(Counter(rej_table.column("reason").to_pylist()).items()))
    by_id = lambda rows: sorted(rows, key=lambda r: r["id"])  # noqa: E731
    return Snapshot(by_id(sft), by_id(pairs), by_id(unpaired), rej_table, out_stats)


def _doc(source: str, rid: str, lang: str, content: str) -> dict:
    """A document record whose id is the snapshot row id, so kept/rejected ids map back to rows."""
    return {**make_doc(source, rid, lang, content), "id": rid}


def _filter_docs(docs: list[dict], params: RLHFParams, decontaminator) -> tuple[set[str], pa.Table]:
    """Run the pipeline's dedup, then its decontamination, over snapshot documents: (kept ids, rejected)."""
    table = to_table(sorted(docs, key=lambda d: d["id"]), DOC_SCHEMA)
    if table.num_rows == 0:
        return set(), REJECT_SCHEMA.empty_table()
    kept, rejected, _ = dedup_table(table, params.data.dedup, params.seed, workers=1)
    rej = [rejected.cast(REJECT_SCHEMA)]
    if decontaminator is not None:
        kept, dropped = decontaminate(kept, decontaminator)
        rej.append(dropped)
    return set(kept.column("id").to_pylist()), pa.concat_tables(rej)


def decontaminate(table: pa.Table, deco) -> tuple[pa.Table, pa.Table]:
    """Drop documents that contain benchmark code, with the pipeline's own n-gram decontaminator."""
    from pipeline.data.records import reject

    keep, dropped = [], []
    for i, doc in enumerate(table.to_pylist()):
        best = deco.match(doc["content"])
        if best is None:
            keep.append(i)
        else:
            dropped.append(reject(doc, STAGE, "decontamination", best[0]))
    return table.take(pa.array(keep, type=pa.int64())), to_table(dropped, REJECT_SCHEMA)


def benchmark_decontaminator(params: RLHFParams):
    """HumanEval (and ``decontam.benchmark_files``) n-gram index: what tuning must not see. None if disabled."""
    if not params.decontam.enabled:
        return None
    from pipeline.data.decontam import build_decontaminator

    return build_decontaminator(params.decontam)


# ------------------------------------------------------------------------------------------- writing
def write_snapshot(snap: Snapshot, out_dir: str | Path, parent: dict) -> dict:
    """Write the datasets, rejected examples, parent and manifest; returns the manifest."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, data in snap.files().items():
        (out / name).write_bytes(data)
    write_rejected(snap.rejected, out)  # → out/rejected.parquet, the pipeline's rejected schema
    (out / PARENT_FILE).write_text(json.dumps(parent, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    manifest = {"content_hash": snap.content_hash, "counts": {"sft": len(snap.sft), "pairs": len(snap.pairs),
                                                              "unpaired": len(snap.unpaired)},
                "parent": parent, "stats": snap.stats}
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return manifest


def read_manifest(snapshot_dir: str | Path) -> dict | None:
    p = Path(snapshot_dir) / MANIFEST_FILE
    if not p.is_file():
        return None
    return json.loads(p.read_text(encoding="utf-8"))


def take_snapshot(params: RLHFParams, db_url: str, parent_from: str = "production") -> tuple[Snapshot, dict]:
    """Read the store and build the snapshot in memory (no files written): (snapshot, parent), the parent as
    :func:`snapshot_parent` picks it."""
    from feedback.db import session_factory

    factory = session_factory(db_url)
    with factory() as s:
        decisions, bounties, purged = load_store(s)
        unseen = load_unseen_kept(s) if params.rlhf.sft_kept else []
        parent = snapshot_parent(s, params.rlhf.base_model, parent_from)
    snap = build_snapshot(decisions, bounties, params, benchmark_decontaminator(params), unseen)
    snap.stats["purged_texts"] = purged
    return snap, parent
