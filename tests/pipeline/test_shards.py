"""`ownllm data shards`: exclusion, decontamination, leak-free split and traceable MDS samples (issue 3 §5)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from shards_helpers import STDLIB, make_params, stdlib_docs, write_corpus

from pipeline.cli import main as ownllm
from pipeline.data.decontam import humaneval_file, read_problems
from pipeline.data.records import read_docs, split_of
from pipeline.data.shards import read_exclude_ids, read_sample_docs, reconstruct, run_shards, write_shards
from pipeline.tokenizer import EOS, FIM_PAD, load_fast


def planted_doc() -> tuple[str, str, str]:
    prob = next(p for p in read_problems(humaneval_file()) if p["task_id"] == "HumanEval/23")
    host = (STDLIB / "colorsys.py").read_text(encoding="utf-8")
    return "leaky/colorsys_plus.py", "python", host + "\n\n" + prob["prompt"] + prob["solution"]


def build(root: Path, exclude: list[str] | None = None, **overrides):
    """Corpus + tokenizer + shards under ``root``; returns the params."""
    write_corpus(root, stdlib_docs(extra=[planted_doc()]))
    params = make_params(root, **overrides)
    if exclude is not None:
        Path(params.shards.exclude_ids).write_text(
            "# excluded by a loss-spike investigation\n" + "".join(f"{i}  # reason\n" for i in exclude) + "\n")
    assert ownllm(["tokenizer", "train", "--params", params.source_file]) == 0
    assert ownllm(["data", "shards", "--params", params.source_file]) == 0
    return params


def read_split(out: str | Path, split: str) -> list[dict]:
    from streaming import StreamingDataset

    ds = StreamingDataset(local=str(Path(out) / split), shuffle=False, batch_size=1)
    return [ds[i] for i in range(ds.num_samples)]


def variant(params, root: Path, exclude: list[str] | None = None, **shards):
    """The same corpus and tokenizer, shards (and rejects) under ``root``, another exclusion list / shards keys."""
    root.mkdir(parents=True, exist_ok=True)
    ex = root / "exclude_ids.txt"
    ex.write_text("".join(f"{i}\n" for i in exclude or []), encoding="utf-8")
    return params.model_copy(update={
        "shards": params.shards.model_copy(update={"out": str(root / "shards"), "exclude_ids": str(ex), **shards}),
        "decontam": params.decontam.model_copy(update={"rejected": str(root / "rejected")})})


def shard_counts(out: str | Path, split: str) -> list[int]:
    return [s["samples"] for s in json.loads((Path(out) / split / "index.json").read_text())["shards"]]


@pytest.fixture(scope="module")
def corpus_ids(tmp_path_factory):
    root = tmp_path_factory.mktemp("ids")
    write_corpus(root, stdlib_docs(extra=[planted_doc()]))
    table = read_docs(root / "dedup", columns=["id", "path"])
    return dict(zip(table.column("path").to_pylist(), table.column("id").to_pylist()))


@pytest.fixture(scope="module")
def built(tmp_path_factory, corpus_ids):
    excluded = [corpus_ids["heapq.py"], corpus_ids["queue.py"]]
    params = build(tmp_path_factory.mktemp("shards"), exclude=excluded + ["0123456789abcdef"])
    return {"params": params, "excluded": excluded, "samples": {s: read_split(params.shards.out, s) for s in ("train", "val")}}


def test_streaming_reads_fixed_length_int32_samples(built):
    seq = built["params"].shards.max_seq_len
    assert built["samples"]["train"] and built["samples"]["val"]
    for samples in built["samples"].values():
        for s in samples:
            assert s["tokens"].dtype == np.int32 and s["tokens"].shape == (seq,)
            assert isinstance(s["doc_spans"], list)


def test_doc_spans_reproduce_tokens_from_dedup(built):
    params = built["params"]
    tok = load_fast(params.tokenizer.out)
    eos, pad = tok.token_to_id(EOS), tok.token_to_id(FIM_PAD)
    table = read_docs(params.data.dedup.out)
    cache: dict[str, list[int]] = {}
    n_masked = 0
    first = built["samples"]["train"][0]
    from_dir = read_sample_docs(first["doc_spans"], params.data.dedup.out)
    assert [(d["id"], d["n_tokens"]) for d in from_dir] == [(sp[0], sp[3]) for sp in first["doc_spans"]]
    assert {"path", "source", "lang", "content", "doc_token_start", "sample_token_start"} <= set(from_dir[0])
    for samples in built["samples"].values():
        for s in samples:
            docs = read_sample_docs(s["doc_spans"], table)
            contents = {d["id"]: d["content"] for d in docs}
            rebuilt = reconstruct(s["doc_spans"], contents, tok, params.shards.max_seq_len, cache)
            masked = s["tokens"] == pad  # positions of a masked (excluded) document
            np.testing.assert_array_equal(rebuilt[~masked], s["tokens"][~masked])
            covered = np.zeros(len(s["tokens"]), bool)
            for _, _, start, n in s["doc_spans"]:
                assert not covered[start:start + n].any()  # spans never overlap
                covered[start:start + n] = True
            assert not (covered & masked).any()
            # Everything else is a document separator or a masked document's position.
            assert np.isin(s["tokens"][~covered], [eos, pad]).all()
            n_masked += int(masked.sum())
    assert n_masked  # built masks two documents


def test_every_document_is_packed_whole_and_in_order(built):
    """Per document, its spans are consecutive pieces of its encoding (only a split's tail is dropped)."""
    params = built["params"]
    tok = load_fast(params.tokenizer.out)
    docs = read_docs(params.data.dedup.out, columns=["id", "content"])
    lengths = {d: len(tok.encode(c).ids) for d, c in zip(docs.column("id").to_pylist(), docs.column("content").to_pylist())}
    report = json.loads((Path(params.tracking.reports_dir) / "shards.json").read_text())
    for split, samples in built["samples"].items():
        got = defaultdict(int)
        order = []
        for s in samples:
            for doc_id, doc_start, _, n in s["doc_spans"]:
                assert doc_start == got[doc_id]
                got[doc_id] += n
                if not order or order[-1] != doc_id:
                    order.append(doc_id)
        canonical = [d for d in docs.column("id").to_pylist() if d in got]  # read_docs order: (lang, id)
        assert order == canonical
        short = {d: lengths[d] - n for d, n in got.items() if n != lengths[d]}
        assert len(short) <= 1 and sum(short.values()) <= report["splits"][split]["tail_tokens_dropped"]
        assert report["splits"][split]["documents"] >= len(got)


def test_split_is_leak_free_and_by_id_hash(built):
    params = built["params"]
    ids = {split: {span[0] for s in samples for span in s["doc_spans"]} for split, samples in built["samples"].items()}
    assert not ids["train"] & ids["val"]
    for split, doc_ids in ids.items():
        assert all(split_of(d, params.shards.val_frac) == split for d in doc_ids)


def test_exclusion_list_removes_exactly_the_named_documents(built, corpus_ids):
    params = built["params"]
    report = json.loads((Path(params.tracking.reports_dir) / "shards.json").read_text())
    tok = load_fast(params.tokenizer.out)
    docs = read_docs(params.data.dedup.out, columns=["id", "content"]).to_pylist()
    # mask (the default): every position the documents took, their separators included.
    masked = sum(len(tok.encode(d["content"]).ids) + 1 for d in docs if d["id"] in built["excluded"])
    assert report["excluded"] == {"mode": "mask", "listed": 3, "removed": 2, "ids": sorted(built["excluded"]),
                                  "not_found": ["0123456789abcdef"], "masked_tokens": masked}
    assert sum(v["masked_documents"] for v in report["splits"].values()) == 2
    in_shards = {span[0] for samples in built["samples"].values() for s in samples for span in s["doc_spans"]}
    planted = corpus_ids["leaky/colorsys_plus.py"]
    tails = {split: v["tail_tokens_dropped"] for split, v in report["splits"].items()}
    missing = set(corpus_ids.values()) - in_shards
    # Gone: the excluded docs and the contaminated one; at most a split's very last doc could hide in a dropped tail.
    assert set(built["excluded"]) | {planted} <= missing
    assert len(missing - set(built["excluded"]) - {planted}) <= sum(1 for t in tails.values() if t)
    total_docs = sum(v["documents"] for v in report["splits"].values())
    assert total_docs == len(corpus_ids) - 3 == report["input_documents"] - 3


def test_planted_humaneval_document_is_rejected_with_problem_id(built, corpus_ids):
    params = built["params"]
    rejected = pq.read_table(Path(params.decontam.rejected) / "rejected.parquet").to_pylist()
    assert [(r["id"], r["reason"], r["detail"]) for r in rejected] == \
        [(corpus_ids["leaky/colorsys_plus.py"], "decontamination", "HumanEval/23")]
    report = json.loads((Path(params.tracking.reports_dir) / "shards.json").read_text())
    assert report["decontaminated"]["documents"] == 1
    assert report["decontaminated"]["by_problem"] == {"HumanEval/23": 1}
    assert report["decontaminated"]["closest_kept_fraction"] < params.decontam.threshold


def test_report_counts_tokens_per_split_and_language(built):
    params = built["params"]
    report = json.loads((Path(params.tracking.reports_dir) / "shards.json").read_text())
    for split, samples in built["samples"].items():
        st = report["splits"][split]
        assert st["samples"] == len(samples)
        assert st["tokens"] == sum(st["tokens_by_lang"].values())
        assert st["sample_tokens"] == len(samples) * params.shards.max_seq_len
        assert st["tokens"] + st["eos_tokens"] + st["masked_tokens"] == st["sample_tokens"] + st["tail_tokens_dropped"]
        assert st["padding_tokens"] == 0
    assert "python" in report["splits"]["train"]["tokens_by_lang"]


@pytest.mark.slow
def test_same_params_give_identical_shard_bytes(built, tmp_path):
    params = built["params"]
    again = build(tmp_path, exclude=built["excluded"] + ["0123456789abcdef"])
    for rel in ("train", "val"):
        a, b = Path(params.shards.out) / rel, Path(again.shards.out) / rel
        # Only what MDSWriter wrote: reading a local-only dataset unpacks shard.*.mds next to the .zstd.
        files = sorted(p.name for p in a.iterdir() if p.suffix in (".json", ".zstd"))
        assert files == sorted(p.name for p in b.iterdir()) and "index.json" in files
        for name in files:
            assert (a / name).read_bytes() == (b / name).read_bytes(), f"{rel}/{name}"
    assert (Path(params.decontam.rejected) / "rejected.parquet").read_bytes() == \
        (Path(again.decontam.rejected) / "rejected.parquet").read_bytes()
    assert (Path(params.tracking.reports_dir) / "shards.json").read_bytes() == \
        (Path(again.tracking.reports_dir) / "shards.json").read_bytes()


def test_masking_keeps_every_other_sample_and_the_shard_layout(built, corpus_ids, tmp_path):
    """mask: same sample count, byte-identical samples without the document, its positions <fim_pad>, no span."""
    params = built["params"]
    tok = load_fast(params.tokenizer.out)
    pad = tok.token_to_id(FIM_PAD)
    docs = read_docs(params.data.dedup.out)
    gone = corpus_ids["heapq.py"]
    n_gone = len(tok.encode(next(d["content"] for d in docs.to_pylist() if d["id"] == gone)).ids)
    # Small shards: with this corpus, the masked samples' shorter doc_spans would move a shard boundary at
    # 5kb and 11kb if MDSWriter decided by the written sizes (they must not: the shuffle depends on them).
    for limit in ("3kb", "5kb", "11kb"):
        base = variant(params, tmp_path / f"base-{limit}", size_limit=limit)
        mask = variant(params, tmp_path / f"mask-{limit}", size_limit=limit)
        stats = write_shards(docs, base), write_shards(docs, mask, {gone})
        split = split_of(gone, params.shards.val_frac)
        assert stats[0][split]["samples"] == stats[1][split]["samples"]
        assert stats[1][split]["masked_documents"] == 1
        assert stats[1][split]["documents"] == stats[0][split]["documents"] - 1
        for s in ("train", "val"):
            assert shard_counts(base.shards.out, s) == shard_counts(mask.shards.out, s)
        before, after = read_split(base.shards.out, split), read_split(mask.shards.out, split)
        assert len(before) == len(after) and len(shard_counts(base.shards.out, split)) > 1
        touched, separator_next = 0, False
        for b, a in zip(before, after):
            expect = b["tokens"].copy()
            if separator_next:  # the document ended exactly at the previous sample's end
                expect[0], separator_next = pad, False
            for _, doc_start, start, n in (sp for sp in b["doc_spans"] if sp[0] == gone):
                expect[start:start + n] = pad
                if doc_start + n == n_gone:  # its separator is masked too
                    if start + n < len(expect):
                        expect[start + n] = pad
                    else:
                        separator_next = True
            assert a["doc_spans"] == [sp for sp in b["doc_spans"] if sp[0] != gone]
            np.testing.assert_array_equal(a["tokens"], expect)
            if (expect == b["tokens"]).all():
                assert a["tokens"].tobytes() == b["tokens"].tobytes() and a["doc_spans"] == b["doc_spans"]
            else:
                touched += 1
        assert touched


def test_drop_mode_removes_the_documents_before_packing(built, corpus_ids, tmp_path):
    """drop: the old behaviour, the listed documents are not packed at all (and nothing is <fim_pad>)."""
    params = variant(built["params"], tmp_path, built["excluded"] + ["0123456789abcdef"], exclude_mode="drop")
    report, _ = run_shards(params)
    assert report["excluded"] == {"mode": "drop", "listed": 3, "removed": 2, "ids": sorted(built["excluded"]),
                                  "not_found": ["0123456789abcdef"], "masked_tokens": 0}
    tok = load_fast(params.tokenizer.out)
    eos, pad = tok.token_to_id(EOS), tok.token_to_id(FIM_PAD)
    masked = json.loads((Path(built["params"].tracking.reports_dir) / "shards.json").read_text())
    for split in ("train", "val"):
        samples = read_split(params.shards.out, split)
        st = report["splits"][split]
        assert st["masked_documents"] == st["masked_tokens"] == 0 and st["samples"] == len(samples)
        assert st["documents"] == masked["splits"][split]["documents"]
        assert st["samples"] <= masked["splits"][split]["samples"]
        for s in samples:
            covered = np.zeros(len(s["tokens"]), bool)
            for doc, _, start, n in s["doc_spans"]:
                assert doc not in built["excluded"]
                covered[start:start + n] = True
            assert (s["tokens"][~covered] == eos).all() and not (s["tokens"] == pad).any()
    assert sum(report["splits"][s]["samples"] for s in ("train", "val")) < \
        sum(masked["splits"][s]["samples"] for s in ("train", "val"))


def test_excluding_a_contaminated_document_changes_no_shard(built, corpus_ids, tmp_path):
    """mask: excluded documents are decontaminated like the rest, so the shards equal those without the list."""
    params = built["params"]
    leaky = corpus_ids["leaky/colorsys_plus.py"]
    reports = {}
    for name, exclude in (("none", []), ("leaky", [leaky])):
        reports[name], _ = run_shards(variant(params, tmp_path / name, exclude))
    assert reports["leaky"]["decontaminated"] == reports["none"]["decontaminated"]
    assert reports["leaky"]["decontaminated"]["by_problem"] == {"HumanEval/23": 1}
    assert reports["leaky"]["excluded"]["removed"] == 1 and reports["leaky"]["excluded"]["masked_tokens"] == 0
    assert reports["leaky"]["splits"] == reports["none"]["splits"]
    for split in ("train", "val"):
        a, b = tmp_path / "none/shards" / split, tmp_path / "leaky/shards" / split
        files = sorted(p.name for p in a.iterdir())
        assert files == sorted(p.name for p in b.iterdir())
        assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


def test_exclusion_list_format(tmp_path):
    p = tmp_path / "ex.txt"
    p.write_text("# header\n\nabc  # why\n  def\n", encoding="utf-8")
    assert read_exclude_ids(p) == ["abc", "def"]
    p.write_text("abc def\n", encoding="utf-8")
    with pytest.raises(ValueError, match="ex.txt:1"):
        read_exclude_ids(p)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_exclude_ids(tmp_path / "missing.txt")


def test_missing_tokenizer_is_a_clear_error(tmp_path, capsys):
    write_corpus(tmp_path, stdlib_docs()[:3])
    params = make_params(tmp_path)
    assert ownllm(["data", "shards", "--params", params.source_file]) == 2
    assert "ownllm tokenizer train" in capsys.readouterr().err
