"""`ownllm data shards`: data/dedup/ → decontaminated, tokenized, traceable MDS training shards.

Order of work: drop benchmark-contaminated documents (decontam.py, to data/rejected/decontam), split by
document-id hash (records.split_of), tokenize in batches on all cores, then pack. The documents named in
the exclusion list (``shards.exclude_ids``, appended to by loss-spike bisecting) are taken out of
training as ``shards.exclude_mode`` says:

- ``mask`` (default): an excluded document is packed where it always was, but every position it takes
  (its tokens and its ``<|endoftext|>``) holds ``<fim_pad>``, which the training collator labels -100, and
  its span is left out of ``doc_spans`` (so FIM, the batch log and bisecting never see it). The sample
  count, every other sample's bytes and the MDS shard boundaries (decided by the size the samples would
  have had unmasked) stay exactly as without the exclusion, and so does streaming's shuffle order: every
  training step whose batch holds no excluded document is bit-identical to the run before. Excluded
  documents are decontaminated like any other, so excluding never changes what decontamination removes.
- ``drop``: excluded documents are removed before decontamination and packing. Every later document
  packs differently and the sample count changes, which reorders the whole shuffled epoch: for removing
  data for good, when step-by-step comparability with earlier runs does not matter.

Packing follows llm-foundry's ``ConcatTokensDataset``: documents in canonical order (lang, id), each
followed by ``<|endoftext|>``, concatenated and cut into samples of exactly ``max_seq_len`` tokens;
a document may run across samples. The final partial sample of each split is DROPPED, as
ConcatTokensDataset does, so no sample is padded (reported as ``tail_tokens_dropped``).

Every sample stores ``doc_spans``: ``[doc_id, doc_token_start, sample_token_start, n_tokens]`` with
``tokens[sample_token_start : sample_token_start + n_tokens] ==
encode(doc.content)[doc_token_start : doc_token_start + n_tokens]``. Positions outside all spans hold
``<|endoftext|>`` (a document separator) or ``<fim_pad>`` (a masked, excluded document), nothing else.
:func:`read_sample_docs` and :func:`reconstruct` turn a sample back into files.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from pipeline.config import Params
from pipeline.data.records import read_docs, reject, split_of, write_rejected
from pipeline.tokenizer import EOS, FIM_PAD, load_fast

STAGE = "shards"
SPLITS = ("train", "val")
COLUMNS = {"tokens": "ndarray:int32", "doc_spans": "json"}


# ------------------------------------------------------------------------------------ exclusion list
def read_exclude_ids(path: str | Path) -> list[str]:
    """Ids from the exclusion list: one per line, ``#`` starts a comment, blank lines ignored."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"exclusion list not found: {p} (create it empty, or fix shards.exclude_ids)")
    ids = []
    for lineno, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        if any(ch.isspace() for ch in entry):
            raise ValueError(f"{p}:{lineno}: expected one document id per line, got {entry!r}")
        ids.append(entry)
    return ids


# -------------------------------------------------------------------------------------------- packing
class Packer:
    """ConcatTokensDataset packing into one MDS writer, recording where every token came from.

    A document added with ``masked=True`` takes its usual positions (its tokens and its separator), but
    they hold ``pad_id`` and it gets no span. With ``layout=True`` shard boundaries are decided by the size
    each sample would have had with its masked spans in it, by MDSWriter's own rule, so masking never
    moves a sample to another shard (streaming's shuffle depends on the samples per shard).
    """

    def __init__(self, writer, seq_len: int, eos_id: int, pad_id: int | None = None, layout: bool = False):
        self.writer, self.seq_len, self.eos_id, self.pad_id = writer, seq_len, eos_id, pad_id
        self.buf = np.empty(seq_len, dtype=np.int32)
        self.fill = 0
        self.spans: list[list] = []
        self.layout_spans: list[list] | None = [] if layout else None  # the spans as if nothing were masked
        self.shard_bytes = writer.extra_bytes_per_shard  # MDSWriter's count of its open shard, by layout size
        self.samples = 0

    def add(self, doc_id: str, ids: np.ndarray, masked: bool = False) -> None:
        if masked and (self.pad_id is None or self.layout_spans is None):
            raise ValueError("masking a document needs a pad id and layout=True")
        pos = 0
        while pos < len(ids):
            take = min(len(ids) - pos, self.seq_len - self.fill)
            span = [doc_id, pos, self.fill, take]
            if masked:
                self.buf[self.fill : self.fill + take] = self.pad_id
            else:
                self.buf[self.fill : self.fill + take] = ids[pos : pos + take]
                self.spans.append(span)
            if self.layout_spans is not None:
                self.layout_spans.append(span)
            self.fill += take
            pos += take
            if self.fill == self.seq_len:
                self._flush()
        self.buf[self.fill] = self.pad_id if masked else self.eos_id
        self.fill += 1
        if self.fill == self.seq_len:
            self._flush()

    def _flush(self) -> None:
        sample = {"tokens": self.buf.copy(), "doc_spans": self.spans}
        if self.layout_spans is not None:
            w = self.writer
            unmasked = {**sample, "doc_spans": self.layout_spans}
            size = len(w.encode_sample(unmasked)) + w.extra_bytes_per_sample
            # MDSWriter.write's rule, applied to the unmasked size. A masked sample is never larger than
            # its unmasked self, so the writer's own check inside write() never fires before this one.
            if w.size_limit and w.size_limit < self.shard_bytes + size:
                w.flush_shard()
                w._reset_cache()
                self.shard_bytes = w.extra_bytes_per_shard
            self.shard_bytes += size
            self.layout_spans = []
        self.writer.write(sample)
        self.samples += 1
        self.fill, self.spans = 0, []


# ---------------------------------------------------------------------------------------------- stage
def apply_exclusions(docs: pa.Table, path: str | Path, mode: str = "mask") -> tuple[pa.Table, set[str], dict]:
    """(documents to go on with, ids to mask, report) for the exclusion list.

    ``drop`` removes exactly the listed documents; ``mask`` keeps every document and returns the listed
    ones to mask when packing (module docstring). The report names the ids taken out of training
    (``removed``, whichever the mode) and the listed ids not found.
    """
    if mode not in ("mask", "drop"):
        raise ValueError(f"shards.exclude_mode must be 'mask' or 'drop', got {mode!r}")
    listed = set(read_exclude_ids(path))
    present = set(docs.column("id").to_pylist())
    removed = sorted(listed & present)
    report = {"mode": mode, "listed": len(listed), "removed": len(removed), "ids": removed,
              "not_found": sorted(listed - present), "masked_tokens": 0}
    if mode == "mask":
        return docs, set(removed), report
    drop = pc.is_in(docs.column("id"), value_set=pa.array(sorted(listed), pa.string()))
    return docs.filter(pc.invert(drop)), set(), report


def decontaminate(docs: pa.Table, cfg) -> tuple[pa.Table, dict]:
    """Drop documents that overlap a benchmark problem into ``cfg.rejected`` (reason, problem id)."""
    from pipeline.data.decontam import build_decontaminator

    rows, keep, closest = [], [], 0.0
    by_problem: dict[str, int] = defaultdict(int)
    if cfg.enabled:
        deco = build_decontaminator(cfg)
        records = docs.to_pylist()
        for i, rec in enumerate(tqdm(records, desc="decontaminate", unit="doc", mininterval=1.0, file=sys.stderr)):
            best = deco.best_match(rec["content"])
            if best and best[1] >= cfg.threshold:
                rows.append(reject(rec, STAGE, "decontamination", best[0]))
                by_problem[best[0]] += 1
            else:
                keep.append(i)
                closest = max(closest, best[1] if best else 0.0)
        docs = docs.take(pa.array(keep, pa.int64()))
    write_rejected(rows, cfg.rejected)
    # closest_kept_fraction shows the margin: how near the most benchmark-like kept document came.
    report = {"enabled": cfg.enabled, "documents": len(rows), "by_problem": dict(sorted(by_problem.items())),
              "closest_kept_fraction": closest, "threshold": cfg.threshold, "ngram": cfg.ngram}
    return docs, report


def encoded_batches(tok, docs: pa.Table, batch_docs: int):
    """(doc ids, langs, token arrays) per batch, in canonical order.

    ``encode_batch_fast`` (encode_batch without character offsets, which nobody here needs) runs on
    all cores and releases the GIL, so the next batch is encoded on a helper thread while the caller
    packs and writes the current one: the bookkeeping hides behind tokenization.
    """
    from concurrent.futures import ThreadPoolExecutor

    def encode(start: int):
        batch = docs.slice(start, batch_docs)
        texts = batch.column("content").to_pylist()
        encs = tok.encode_batch_fast(texts, add_special_tokens=False)
        arrays = [np.array(e.ids, dtype=np.int32) for e in encs]
        return batch.column("id").to_pylist(), batch.column("lang").to_pylist(), arrays, sum(map(len, map(str.encode, texts)))

    total = int(pc.sum(pc.binary_length(docs.column("content").cast(pa.large_binary()))).as_py() or 0)
    starts = list(range(0, docs.num_rows, batch_docs))
    with tqdm(total=total, desc="tokenize", unit="B", unit_scale=True, mininterval=1.0, file=sys.stderr) as bar, \
            ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(encode, starts[0]) if starts else None
        for nxt in starts[1:] + [None]:
            ids, langs, arrays, n_bytes = pending.result()
            pending = pool.submit(encode, nxt) if nxt is not None else None
            yield ids, langs, arrays
            bar.update(n_bytes)


def write_shards(docs: pa.Table, params: Params, masked: set[str] = frozenset()) -> dict:
    """Tokenize and pack ``docs`` into the train/val MDS shards, masking the documents in ``masked``.

    Per split, ``documents``/``tokens`` count the documents trained on; ``masked_documents`` and
    ``masked_tokens`` (every position they take, separators included) the masked ones.
    """
    from streaming import MDSWriter

    cfg = params.shards
    tok = load_fast(params.tokenizer.out)
    eos_id = tok.token_to_id(EOS)
    if eos_id is None:
        raise ValueError(f"tokenizer in {params.tokenizer.out} has no {EOS} token")
    pad_id = tok.token_to_id(FIM_PAD)
    if masked and pad_id is None:
        raise ValueError(f"tokenizer in {params.tokenizer.out} has no {FIM_PAD} token to mask excluded documents "
                         f"with (or set shards.exclude_mode: drop)")
    stats = {s: {"documents": 0, "tokens": 0, "tokens_by_lang": defaultdict(int), "masked_documents": 0,
                 "masked_tokens": 0} for s in SPLITS}
    writers, packers = {}, {}
    for split in SPLITS:
        out = Path(cfg.out) / split
        if out.exists():
            shutil.rmtree(out)
        writers[split] = MDSWriter(out=str(out), columns=COLUMNS, compression="zstd", size_limit=cfg.size_limit)
        # Layout bookkeeping only when something is masked: otherwise MDSWriter decides alone, identically.
        packers[split] = Packer(writers[split], cfg.max_seq_len, eos_id, pad_id, layout=bool(masked))
    for ids, langs, arrays in encoded_batches(tok, docs, cfg.encode_batch_docs):
        for doc_id, lang, arr in zip(ids, langs, arrays):
            split = split_of(doc_id, cfg.val_frac)
            st = stats[split]
            if doc_id in masked:
                packers[split].add(doc_id, arr, masked=True)
                st["masked_documents"] += 1
                st["masked_tokens"] += len(arr) + 1
                continue
            packers[split].add(doc_id, arr)
            st["documents"] += 1
            st["tokens"] += len(arr)
            st["tokens_by_lang"][lang] += len(arr)
    for split in SPLITS:
        writers[split].finish()
        p, st = packers[split], stats[split]
        st["tokens_by_lang"] = dict(sorted(st["tokens_by_lang"].items()))
        st["eos_tokens"] = st["documents"]
        st["samples"] = p.samples
        st["sample_tokens"] = p.samples * cfg.max_seq_len
        st["tail_tokens_dropped"] = p.fill  # the final partial sample (ConcatTokensDataset drops it)
        st["padding_tokens"] = 0
        st["padding_waste"] = 0.0
        total = st["tokens"] + st["eos_tokens"] + st["masked_tokens"]
        st["tail_waste"] = round(p.fill / total, 6) if total else 0.0
    return stats


def run_shards(params: Params) -> tuple[dict, dict]:
    timings = {}
    t0 = time.perf_counter()
    docs = read_docs(params.data.dedup.out)
    n_input = docs.num_rows
    # mask: excluded documents are decontaminated like the rest (and masked if they stay), so the packed
    # documents are exactly those of a run without the exclusions; drop: they go before decontamination.
    docs, masked, excluded = apply_exclusions(docs, params.shards.exclude_ids, params.shards.exclude_mode)
    docs, decontam = decontaminate(docs, params.decontam)
    masked &= set(docs.column("id").to_pylist())
    timings["filter_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    splits = write_shards(docs, params, masked)
    excluded["masked_tokens"] = sum(splits[s]["masked_tokens"] for s in SPLITS)
    timings["tokenize_and_write_s"] = time.perf_counter() - t0
    timings["source_bytes"] = int(pc.sum(pc.binary_length(docs.column("content").cast(pa.large_binary()))).as_py() or 0)
    report = {
        "input_documents": n_input,
        "excluded": excluded,
        "decontaminated": decontam,
        "max_seq_len": params.shards.max_seq_len,
        "final_partial_sample": "dropped",
        "splits": splits,
    }
    return report, timings


def main(args) -> int:
    from pipeline.cli import UserError
    from pipeline.config import load_params
    from pipeline.tracking import say, stage_run

    params = load_params(args.params)
    with stage_run(STAGE, params) as run:
        try:
            report, timings = run_shards(params)
        except (FileNotFoundError, ValueError) as exc:
            raise UserError(str(exc)) from None
        run.summary(report)
        run.log(timings)
    tr, va = report["splits"]["train"], report["splits"]["val"]
    secs = timings["tokenize_and_write_s"]
    say(f"[shards] {tr['samples']} train / {va['samples']} val samples of {params.shards.max_seq_len} tokens "
        f"({tr['tokens'] + va['tokens']} tokens, {timings['source_bytes'] / 1e6 / secs:.1f} MB/s); "
        f"excluded {report['excluded']['removed']} ({report['excluded']['mode']}), decontaminated {report['decontaminated']['documents']} → {params.shards.out}")
    return 0


# ----------------------------------------------------------------------------- tracing samples to files
def read_sample_docs(doc_spans: list, docs: str | Path | pa.Table = "data/dedup",
                     columns: tuple[str, ...] = ("id", "source", "path", "lang", "content")) -> list[dict]:
    """The documents a sample was cut from, in sample order, each with its span fields.

    ``doc_spans`` is a sample's ``doc_spans`` column (or several samples' spans concatenated);
    ``docs`` is the data/dedup directory, or a table already read from it (for many look-ups).
    """
    wanted = sorted({span[0] for span in doc_spans})
    table = docs if isinstance(docs, pa.Table) else read_docs(docs, columns=list(dict.fromkeys(("id", *columns))))
    table = table.filter(pc.is_in(table.column("id"), value_set=pa.array(wanted, pa.string())))
    by_id = {rec["id"]: rec for rec in table.to_pylist()}
    missing = [d for d in wanted if d not in by_id]
    if missing:
        where = "the given table" if isinstance(docs, pa.Table) else str(docs)
        raise KeyError(f"documents not in {where}: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    return [{**by_id[d], "doc_token_start": a, "sample_token_start": b, "n_tokens": n} for d, a, b, n in doc_spans]


def reconstruct(doc_spans: list, contents: dict[str, str], tokenizer, seq_len: int,
                cache: dict[str, list[int]] | None = None) -> np.ndarray:
    """Rebuild a sample's tokens from document text alone: spans re-encoded, ``<|endoftext|>`` elsewhere.

    ``tokenizer`` is a ``tokenizers.Tokenizer`` (see pipeline.tokenizer.load_fast); ``contents`` maps
    doc id → content (e.g. from :func:`read_sample_docs`). Equal to the stored ``tokens`` by contract,
    except where the stored sample holds ``<fim_pad>`` outside every span: the positions of a masked
    (excluded) document, which the spans deliberately no longer name.
    Pass one ``cache`` dict across calls to encode each document once when replaying many samples.
    """
    out = np.full(seq_len, tokenizer.token_to_id(EOS), dtype=np.int32)
    cache = {} if cache is None else cache
    for doc_id, doc_start, sample_start, n in doc_spans:
        if doc_id not in cache:
            cache[doc_id] = tokenizer.encode(contents[doc_id], add_special_tokens=False).ids
        out[sample_start : sample_start + n] = cache[doc_id][doc_start : doc_start + n]
    return out
