"""Exact and near dedup on real code: accuracy on a labelled set, clusters, sources, determinism."""

from __future__ import annotations

import argparse

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.config import DedupConfig, parse_params
from pipeline.data import commands, dedup
from pipeline.data.dedup_spec import banding
from benchmarks.dedup_labelled import build_neardup_set, pairwise_scores
from pipeline.data.records import CLEAN_SCHEMA, make_doc, read_docs, read_rejected, to_table, write_docs
from tests.conftest import REPO, stdlib_files

CFG = DedupConfig()
SEED = 1234


def clean_table(docs: list[tuple[str, str, str]], lang: str = "python") -> pa.Table:
    """A table in the clean schema from (source, path, content) triples."""
    rows = []
    for source, path, content in docs:
        d = make_doc(source, path, lang, content)
        d["pii_redactions"] = {"email": 0, "ip_address": 0, "key": 0}
        rows.append(d)
    return to_table(rows, CLEAN_SCHEMA)


def kept_of(table: pa.Table, kept: pa.Table, rejected: pa.Table) -> list[str]:
    """For each input document, the id of the document that stands for it in the output."""
    detail = dict(zip(rejected.column("id").to_pylist(), rejected.column("detail").to_pylist()))
    return [detail.get(i, i) for i in table.column("id").to_pylist()]


@pytest.fixture(scope="module")
def labelled():
    s = build_neardup_set(n_originals=24, n_boilerplate=24, seed=3)
    table = clean_table([("stdlib", name, text) for name, text in zip(s.names, s.texts)])
    kept, rejected, metrics = dedup.dedup_table(table, CFG, SEED, workers=2)
    return s, table, kept, rejected, metrics


def test_labelled_near_duplicates_are_found_and_boilerplate_is_not_merged(labelled):
    s, table, kept, rejected, metrics = labelled
    scores = pairwise_scores(kept_of(table, kept, rejected), s.groups)
    assert scores["precision"] >= 0.99 and scores["recall"] >= 0.95, scores
    kept_ids = set(kept.column("id").to_pylist())
    kept_per_group: dict[int, int] = {}
    for doc_id, group, kind in zip(table.column("id").to_pylist(), s.groups, s.kinds):
        kept_per_group[group] = kept_per_group.get(group, 0) + (doc_id in kept_ids)
        if kind in ("boilerplate", "overlap"):  # shared licence header / a large shared block, J < 0.6
            assert doc_id in kept_ids, f"a distinct {kind} file was merged"
    assert set(kept_per_group.values()) == {1}  # one representative per group of variants
    assert s.kinds.count("overlap") >= 8
    assert metrics["near_duplicates"] == table.num_rows - kept.num_rows == 4 * 24


def test_every_removed_document_names_a_kept_one(labelled):
    _, table, kept, rejected, metrics = labelled
    kept_ids = set(kept.column("id").to_pylist())
    assert rejected.num_rows + kept.num_rows == table.num_rows
    assert set(rejected.column("stage").to_pylist()) == {"dedup"}
    assert set(rejected.column("reason").to_pylist()) <= {"exact_duplicate", "near_duplicate"}
    assert set(rejected.column("detail").to_pylist()) <= kept_ids
    assert kept.schema.equals(CLEAN_SCHEMA)  # pii_redactions survive
    assert metrics["lsh"]["bands"] * metrics["lsh"]["rows"] <= CFG.num_perm


def test_output_does_not_depend_on_worker_count(labelled):
    _, table, kept, rejected, metrics = labelled
    kept1, rejected1, metrics1 = dedup.dedup_table(table, CFG, SEED, workers=1)
    assert kept1.equals(kept) and rejected1.equals(rejected) and metrics1 == metrics
    shuffled = table.take(pa.array(list(range(table.num_rows))[::-1]))
    kept2, _, _ = dedup.dedup_table(shuffled, CFG, SEED, workers=2)
    assert sorted(kept2.column("id").to_pylist()) == sorted(kept.column("id").to_pylist())


def test_exact_copies_point_at_the_document_that_survives_near_dedup():
    text = stdlib_files(["textwrap.py"])["textwrap.py"]
    lines = text.split("\n")
    variant = "\n".join(lines[:40] + lines[44:])  # a near duplicate of text
    docs = [("a", "textwrap.py", text), ("b", "copy.py", text.replace("\n", "\r\n") + "\n\n"),
            ("c", "edited.py", variant), ("d", "empty.py", "+ - * /\n"), ("e", "empty2.py", "+ - * /\n\n")]
    table = clean_table(docs)
    kept, rejected, metrics = dedup.dedup_table(table, CFG, SEED, workers=1)
    assert kept.num_rows == 2  # one textwrap, one of the token-less files
    reasons = dict(zip(rejected.column("path").to_pylist(), rejected.column("reason").to_pylist()))
    assert reasons["empty2.py"] == "exact_duplicate" or reasons["empty.py"] == "exact_duplicate"
    assert sorted(reasons.values()).count("near_duplicate") == 1
    assert set(rejected.column("detail").to_pylist()) <= set(kept.column("id").to_pylist())
    assert metrics["exact_duplicates"] == 2 and metrics["near_duplicates"] == 1
    assert metrics["largest_cluster"] == 3 and metrics["cross_source_duplicates"] == 3  # five sources


def test_a_new_source_is_deduplicated_against_the_old_ones():
    old = stdlib_files(["heapq.py", "bisect.py", "shlex.py", "glob.py"])
    new = {
        "vendored/heapq.py": old["heapq.py"].replace("    ", "\t"),  # re-indented copy
        "vendored/shlex.py": old["shlex.py"].replace("shlex", "lexer"),  # renamed
        "vendored/fresh.py": stdlib_files(["colorsys.py"])["colorsys.py"],  # genuinely new
    }
    before = clean_table([("stdlib", p, t) for p, t in old.items()])
    after = clean_table([("stdlib", p, t) for p, t in old.items()] + [("vendor", p, t) for p, t in new.items()])
    kept_before, _, _ = dedup.dedup_table(before, CFG, SEED, workers=1)
    kept, rejected, metrics = dedup.dedup_table(after, CFG, SEED, workers=1)
    assert kept.num_rows == kept_before.num_rows + 1  # only the new file adds a document
    assert metrics["cross_source_duplicates"] == 2 and metrics["near_duplicates"] == 2
    stems = [p.rsplit("/", 1)[-1] for p in kept.column("path").to_pylist()]
    assert sorted(stems) == ["bisect.py", "fresh.py", "glob.py", "heapq.py", "shlex.py"]


def test_empty_input_and_switched_off_stages():
    kept, rejected, metrics = dedup.dedup_table(CLEAN_SCHEMA.empty_table(), CFG, SEED)
    assert kept.num_rows == rejected.num_rows == metrics["documents_out"] == 0
    text = stdlib_files(["bisect.py"])["bisect.py"]
    table = clean_table([("a", "x.py", text), ("b", "y.py", text + "\n# one more comment line\n")])
    kept, _, m = dedup.dedup_table(table, CFG.model_copy(update={"near": False}), SEED)
    assert kept.num_rows == 2 and m["near_duplicates"] == 0
    kept, _, m = dedup.dedup_table(table, CFG.model_copy(update={"exact": False}), SEED)
    assert kept.num_rows == 1 and m["near_duplicates"] == 1


def test_config_rejects_inconsistent_banding():
    with pytest.raises(ValueError, match="both bands and rows"):
        DedupConfig(bands=16)
    with pytest.raises(ValueError, match="exceeds num_perm"):
        DedupConfig(bands=64, rows=8)
    assert banding(DedupConfig(bands=16, rows=16)) == (16, 16)


def test_stage_writes_outputs_byte_identically_and_reports_a_missing_input(tmp_path, capsys):
    files = stdlib_files(["heapq.py", "bisect.py", "glob.py"])
    table = clean_table([("s", p, t) for p, t in files.items()] + [("t", "dup.py", files["glob.py"] + "\n")])
    write_docs(table, tmp_path / "clean")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["dedup"].update(input=str(tmp_path / "clean"), out=str(tmp_path / "dedup"),
                                   rejected=str(tmp_path / "rejected" / "dedup"))
    params["tracking"]["reports_dir"] = str(tmp_path / "reports")
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    outputs = []
    for _ in range(2):
        assert commands.dedup(argparse.Namespace(params=str(path))) == 0
        outputs.append([p.read_bytes() for p in sorted(tmp_path.glob("*/**/*.parquet")) if "clean" not in str(p)]
                       + [(tmp_path / "reports" / "dedup.json").read_bytes()])
    assert outputs[0] == outputs[1] and len(outputs[0]) == 3
    assert read_docs(tmp_path / "dedup").num_rows == 3
    rej = read_rejected(tmp_path / "rejected").to_pylist()
    assert [(r["path"], r["reason"]) for r in rej] in ([("dup.py", "exact_duplicate")], [("glob.py", "exact_duplicate")])
    assert "[dedup] 4 → 3 documents" in capsys.readouterr().err
    assert pq.read_schema(next((tmp_path / "dedup").glob("lang=*/*.parquet"))).field("pii_redactions")

    from pipeline.cli import UserError

    params["data"]["dedup"]["input"] = str(tmp_path / "missing")
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(UserError, match="missing"):
        commands.dedup(argparse.Namespace(params=str(path)))
    parse_params(params)  # the file itself is valid: only the input is missing
