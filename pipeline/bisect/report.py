"""What the bisect found, for people: the documents, why each stands out, and the evidence.

"Why it stands out" compares each named document with the other documents of the spike window on
cheap, well-known signals: repetition (zlib compression ratio, as in Gopher/RefinedWeb quality filters),
length, alphanumeric fraction and the model's own loss on it at the spike step.
"""

from __future__ import annotations

import sys
import zlib
from pathlib import Path
from statistics import median
from typing import Any

from pipeline.config import Params

SNIPPET_CHARS = 160


def features(content: str) -> dict[str, float | int]:
    raw = content.encode("utf-8", "surrogatepass")
    return {
        "bytes": len(raw),
        "lines": content.count("\n") + (0 if content.endswith("\n") or not content else 1),
        "compression_ratio": round(len(zlib.compress(raw, 9)) / len(raw), 4) if raw else 1.0,
        "alnum_frac": round(sum(ch.isalnum() for ch in content) / len(content), 4) if content else 0.0,
    }


def document_records(params: Params, ids: list[str]) -> dict[str, dict]:
    """id → {source, path, lang, content} from data/dedup (the shards stage's input); {} when it is absent."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from pipeline.data.records import doc_files, read_docs

    root = Path(params.data.dedup.out)
    if not root.is_dir() or not doc_files(root):
        return {}
    table = read_docs(root, columns=["id", "source", "path", "lang", "content"])
    table = table.filter(pc.is_in(table.column("id"), value_set=pa.array(sorted(set(ids)), pa.string())))
    return {r["id"]: r for r in table.to_pylist()}


def window_texts(params: Params, window, tokenizer) -> dict[str, str]:
    """Fallback when data/dedup is gone: each window document's text, decoded from the shards' tokens."""
    from pipeline.train import data as tdata

    pieces: dict[str, dict[int, list[int]]] = {}
    ds = tdata.make_dataset(params, "train", params.train.global_batch_size)
    try:
        for idx, spans in window.spans.items():
            tokens = ds[idx]["tokens"]
            for doc, doc_start, start, n in spans:
                pieces.setdefault(doc, {})[doc_start] = tokens[start:start + n].tolist()
    finally:
        tdata.release(ds)
    return {d: tokenizer.decode([t for k in sorted(p) for t in p[k]]) for d, p in pieces.items()}


def snippet(content: str) -> str:
    text = " ".join(content.split())
    return text if len(text) <= SNIPPET_CHARS else text[:SNIPPET_CHARS - 1] + "…"


def stand_out(doc: dict, others: list[dict], running_mean: float) -> list[str]:
    """Reasons, strongest first, that set ``doc`` apart from the other window documents."""
    reasons = []
    if not others:
        return reasons

    def med(key: str) -> float:
        return median(float(o[key]) for o in others)

    cr = med("compression_ratio")
    if doc["compression_ratio"] < 0.6 * cr:
        reasons.append(f"repetitive: compresses to {doc['compression_ratio']:.0%} of its size (window median {cr:.0%})")
    if doc["compression_ratio"] > 1.4 * cr:
        reasons.append(f"incompressible/random: compresses to {doc['compression_ratio']:.0%} (window median {cr:.0%})")
    b = med("bytes")
    if doc["bytes"] > 3 * b:
        reasons.append(f"long: {doc['bytes']:,} bytes (window median {b:,.0f})")
    a = med("alnum_frac")
    if abs(doc["alnum_frac"] - a) > 0.2:
        reasons.append(f"alphanumeric fraction {doc['alnum_frac']:.0%} (window median {a:.0%})")
    loss = doc.get("spike_step_loss")
    if loss is not None and loss == loss and loss > 1.25 * running_mean:
        reasons.append(f"per-token loss {loss:.2f} at the spike step (run's mean before it {running_mean:.2f})")
    return reasons or ["nothing unusual on the cheap signals: its effect shows only through training"]


def document_table(params: Params, window, names: list[str], spike_doc_losses: dict, running_mean: float,
                   tokenizer) -> list[dict[str, Any]]:
    """One row per named document: metadata, features, reasons; window medians are the reference."""
    ids = window.documents()
    records = document_records(params, ids)
    texts = {d: r["content"] for d, r in records.items()}
    if len(texts) < len(ids):
        texts = {**window_texts(params, window, tokenizer), **texts}
    feats = {d: features(texts.get(d, "")) for d in ids}
    rows = []
    for d in names:
        rec = records.get(d, {})
        row = {"id": d, "source": rec.get("source"), "path": rec.get("path"), "lang": rec.get("lang"),
               "snippet": snippet(texts.get(d, "")), **feats[d], "steps": window.steps_of(d),
               "spike_step_loss": spike_doc_losses.get(d, {}).get("loss"),
               "spike_step_tokens": spike_doc_losses.get(d, {}).get("tokens", 0)}
        row["at_spike_step"] = window.spike in row["steps"]
        row["why"] = stand_out(row, [feats[o] for o in ids if o not in names], running_mean)
        rows.append(row)
    return rows


def render(report: dict[str, Any], file=None) -> None:
    """The readable table (rich), on stderr so stdout stays machine-readable."""
    from rich.console import Console
    from rich.table import Table

    console = Console(file=file or sys.stderr, width=160)
    ev = report["evidence"]

    def fmt(loss: float | None) -> str:
        return "nothing left to measure" if loss is None else f"{loss:.4f}"
    console.print(f"[bold]Spike at step {report['step']}[/] of run {report['run']}: "
                  f"{'reproduces' if report['reproduces'] else 'does NOT reproduce'} "
                  f"(original loss {report['original_loss']:.4f}, replayed {fmt(ev['with_all'])}, "
                  f"threshold {report['threshold']:.4f}); window steps {report['window']['start']}..{report['step']}, "
                  f"{report['window']['documents']} documents, {report['search']['replays']} replays")
    if not report["documents"]:
        return
    table = Table(title="Documents behind the spike", show_lines=True)
    for col in ("id", "source / path", "lang", "steps", "loss@spike", "why it stands out", "snippet"):
        table.add_column(col, overflow="fold")
    for d in report["documents"]:
        loss = d["spike_step_loss"]
        table.add_row(d["id"], f"{d['source'] or '?'} / {d['path'] or '?'}", d["lang"] or "?",
                      ",".join(map(str, d["steps"])), "-" if loss is None else f"{loss:.2f}", "\n".join(d["why"]),
                      d["snippet"][:80])
    console.print(table)
    console.print(f"loss at step {report['step']}: {fmt(ev['with_all'])} with everything, "
                  f"{fmt(ev['without_named'])} without these documents")
