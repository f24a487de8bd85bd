"""`ownllm data ingest`: sources named in params.yaml → one parquet dataset partitioned by language.

Sources are local directory trees (globs), The Stack-style parquet, Hugging Face dataset ids, or JSONL.
Nothing that is wrong with one file stops the stage: binary, non-UTF-8, empty and oversized files and
malformed records are rejected with a reason and counted.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterator

import pyarrow as pa
import pyarrow.dataset as pads
from tqdm import tqdm

from pipeline.config import IngestConfig, Params, SourceConfig
from pipeline.data.records import DOC_SCHEMA, make_doc, reason_counts, reject, to_table, write_docs, write_rejected

STAGE = "ingest"
BINARY_SNIFF_BYTES = 8192


@dataclass
class Candidate:
    """One file or record as a source yields it, before any checks."""

    path: str
    data: bytes | str | None  # None when the file was too large to read
    size: int
    lang: str | None = None


@dataclass
class SourceResult:
    docs: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    file_hashes: dict[str, str] = field(default_factory=dict)


def language_of(path: str, extensions: dict[str, str]) -> str | None:
    return extensions.get(PurePosixPath(path).suffix.lower())


def _matches(rel: str, patterns: list[str]) -> bool:
    # fnmatch's "*" also crosses "/", so "**/x/**" style globs behave as users expect.
    return any(fnmatch.fnmatchcase(rel, p) or fnmatch.fnmatchcase(rel, p.removeprefix("**/")) for p in patterns)


def iter_dir(src: SourceConfig, cfg: IngestConfig) -> Iterator[Candidate]:
    root = Path(src.resolved_path())
    files: set[Path] = set()
    for pattern in src.include:
        files.update(p for p in root.glob(pattern) if p.is_file() and not p.is_symlink())
    for p in sorted(files):
        rel = p.relative_to(root).as_posix()
        if src.exclude and _matches(rel, src.exclude):
            continue
        size = p.stat().st_size
        data = p.read_bytes() if size <= cfg.max_file_bytes else None
        yield Candidate(rel, data, size, src.lang)


def _table_records(table: pa.Table, src: SourceConfig) -> Iterator[Candidate]:
    cols = set(table.column_names)
    if "content" not in cols:
        raise ValueError(f"source {src.name!r}: table has no 'content' column (columns: {sorted(cols)})")
    path_col = next((c for c in ("max_stars_repo_path", "path", "max_forks_repo_path") if c in cols), None)
    for i, row in enumerate(table.to_pylist()):
        content = row.get("content")
        path = str(row.get(path_col) or f"row-{i}") if path_col else f"row-{i}"
        lang = src.lang or _normalise_lang(row.get("lang"))
        ext = row.get("ext")
        if ext and not PurePosixPath(path).suffix:
            path = f"{path}.{str(ext).lstrip('.')}"
        if content is None:
            yield Candidate(path, b"", 0, lang)
        else:
            yield Candidate(path, content, len(content.encode("utf-8", "surrogatepass")), lang)


def _normalise_lang(value: object) -> str | None:
    if not value:
        return None
    v = str(value).strip().lower().replace(" ", "")
    return {"c++": "cpp", "js": "javascript", "py": "python", "ts": "typescript"}.get(v, v)


def iter_parquet(src: SourceConfig, cfg: IngestConfig) -> Iterator[Candidate]:
    path = Path(src.resolved_path())
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.parquet"))
    else:
        files = [path]
    for f in files:
        dataset = pads.dataset(f, format="parquet")
        for batch in dataset.to_batches():
            yield from _table_records(pa.Table.from_batches([batch]), src)


def iter_hf(src: SourceConfig, cfg: IngestConfig) -> Iterator[Candidate]:
    """A The Stack-style dataset from the Hugging Face hub (needs the network; offline by default)."""
    import datasets

    try:
        ds = datasets.load_dataset(src.path, data_dir=src.hf_data_dir, split=src.hf_split)
    except Exception as exc:  # the hub is unreachable or the id is wrong: say which source failed
        raise SourceError(f"source {src.name!r}: cannot load Hugging Face dataset {src.path!r}: {exc}") from exc
    yield from _table_records(ds.data.table, src)


def iter_jsonl(src: SourceConfig, cfg: IngestConfig, bad: list[dict]) -> Iterator[Candidate]:
    path = Path(src.resolved_path())
    files = sorted(path.rglob("*.jsonl")) if path.is_dir() else [path]
    for f in files:
        with f.open("rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                where = f"{f.name}:{lineno}"
                if not raw.strip():
                    continue
                try:
                    rec = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    bad.append(reject({"source": src.name, "path": where}, STAGE, "bad_record", f"invalid JSON: {exc}"))
                    continue
                if not isinstance(rec, dict) or not isinstance(rec.get("content"), str) or not isinstance(rec.get("path"), str):
                    bad.append(reject({"source": src.name, "path": where}, STAGE, "bad_record",
                                      "a JSONL record needs string fields 'path' and 'content'"))
                    continue
                content = rec["content"]
                yield Candidate(rec["path"], content, len(content.encode("utf-8", "surrogatepass")),
                                src.lang or _normalise_lang(rec.get("lang")))


class SourceError(RuntimeError):
    pass


def check_candidate(src: SourceConfig, c: Candidate, cfg: IngestConfig) -> tuple[dict | None, dict | None]:
    """Turn a candidate into a document, or into a rejected record with its reason."""
    base = {"source": src.name, "path": c.path, "size_bytes": c.size, "lang": c.lang or ""}
    lang = c.lang or language_of(c.path, cfg.extensions)
    if lang is None:
        return None, reject(base, STAGE, "unknown_language", PurePosixPath(c.path).suffix)
    base["lang"] = lang
    if c.size > cfg.max_file_bytes or c.data is None:
        return None, reject(base, STAGE, "oversized", f"{c.size} > {cfg.max_file_bytes} bytes")
    if isinstance(c.data, bytes):
        if b"\0" in c.data[:BINARY_SNIFF_BYTES]:
            return None, reject(base, STAGE, "binary", "NUL byte in the first 8 KiB")
        try:
            text = c.data.decode("utf-8")
        except UnicodeDecodeError as exc:
            return None, reject(base, STAGE, "non_utf8", str(exc)[:200])
    else:
        text = c.data
        if "\0" in text[:BINARY_SNIFF_BYTES]:
            return None, reject(base, STAGE, "binary", "NUL character in the first 8 KiB")
    if text.startswith("\ufeff"):
        text = text[1:]
    if not text.strip():
        return None, reject(base, STAGE, "empty")
    # Lone surrogates cannot be stored as UTF-8 and are never valid source text.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return None, reject(base, STAGE, "non_utf8", str(exc)[:200])
    return make_doc(src.name, c.path, lang, text, raw_size=c.size), None


def ingest_source(src: SourceConfig, cfg: IngestConfig) -> SourceResult:
    result = SourceResult()
    bad: list[dict] = []
    if src.kind == "dir":
        root = Path(src.resolved_path())
        if not root.is_dir():
            if src.required:
                raise SourceError(f"source {src.name!r}: directory not found: {root}")
            print(f"[ingest] skipping optional source {src.name!r}: {root} not found", file=sys.stderr)
            return result
        it: Iterator[Candidate] = iter_dir(src, cfg)
    elif src.kind in ("parquet", "jsonl"):
        if not Path(src.resolved_path()).exists():
            if src.required:
                raise SourceError(f"source {src.name!r}: {src.kind} path not found: {src.resolved_path()}")
            print(f"[ingest] skipping optional source {src.name!r}: not found", file=sys.stderr)
            return result
        it = iter_parquet(src, cfg) if src.kind == "parquet" else iter_jsonl(src, cfg, bad)
    else:
        it = iter_hf(src, cfg)
    seen_paths: Counter[str] = Counter()
    for c in tqdm(it, desc=f"ingest {src.name}", unit="file", mininterval=1.0, file=sys.stderr):
        seen_paths[c.path] += 1
        if seen_paths[c.path] > 1:  # two records with one path in a table source: keep both, apart
            c.path = f"{c.path}#{seen_paths[c.path]}"
        raw = c.data.encode("utf-8", "surrogatepass") if isinstance(c.data, str) else (c.data or b"")
        result.file_hashes[c.path] = hashlib.sha256(raw).hexdigest()[:16] if c.data is not None else f"size:{c.size}"
        doc, rej = check_candidate(src, c, cfg)
        if doc is not None:
            result.docs.append(doc)
        else:
            result.rejected.append(rej)
    result.rejected.extend(bad)
    return result


def manifest_entry(src: SourceConfig, res: SourceResult) -> dict:
    h = hashlib.sha256()
    for path in sorted(res.file_hashes):
        h.update(f"{path}\t{res.file_hashes[path]}\n".encode("utf-8", "surrogateescape"))
    return {
        "name": src.name,
        "kind": src.kind,
        "path": src.path,
        "resolved_path": src.resolved_path(),
        "inputs": len(res.file_hashes),
        "documents": len(res.docs),
        "rejected": len(res.rejected),
        "sha256": h.hexdigest(),
        "files": dict(sorted(res.file_hashes.items())),
    }


def run_ingest(params: Params) -> dict:
    """The stage on this machine: every source → data/raw, data/rejected/ingest and the manifest."""
    cfg = params.data.ingest
    docs: list[dict] = []
    rejected: list[dict] = []
    manifest = []
    for src in params.data.sources:
        res = ingest_source(src, cfg)
        docs.extend(res.docs)
        rejected.extend(res.rejected)
        manifest.append(manifest_entry(src, res))
    table = to_table(docs, DOC_SCHEMA)
    write_docs(table, cfg.out, cfg.row_group_rows)
    rej_table = to_table(rejected, DOC_SCHEMA.append(pa.field("stage", pa.string())).append(
        pa.field("reason", pa.string())).append(pa.field("detail", pa.string())))
    write_rejected(rej_table, cfg.rejected)
    from pipeline.tracking import write_json

    write_json(Path(cfg.out) / "manifest.json", {"sources": manifest})
    by_lang = Counter(d["lang"] for d in docs)
    return {
        "documents": len(docs),
        "bytes": sum(d["size_bytes"] for d in docs),
        "documents_by_lang": dict(sorted(by_lang.items())),
        "documents_by_source": {m["name"]: m["documents"] for m in manifest},
        "rejected": len(rejected),
        "rejected_by_reason": reason_counts(rej_table),
    }
