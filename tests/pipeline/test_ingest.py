import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.config import parse_params
from pipeline.data.ingest import SourceError, run_ingest
from pipeline.data.records import DOC_COLUMNS, doc_id, read_docs

from tests.conftest import STDLIB


def make_params(tmp_path: Path, sources: list[dict], **ingest) -> object:
    return parse_params({
        "data": {
            "sources": sources,
            "ingest": {"out": str(tmp_path / "raw"), "rejected": str(tmp_path / "rej"), **ingest},
        },
        "tracking": {"reports_dir": str(tmp_path / "reports")},
    })


@pytest.fixture
def messy_tree(tmp_path) -> Path:
    root = tmp_path / "src"
    (root / "pkg").mkdir(parents=True)
    for name in ("textwrap.py", "shlex.py"):
        (root / "pkg" / name).write_text((STDLIB / name).read_text())
    (root / "app.js").write_text("export function add(a, b) {\n  return a + b;\n}\n")
    (root / "blob.py").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00binary")
    (root / "latin1.py").write_bytes("caf\xe9 = 1\n".encode("latin-1"))
    (root / "empty.py").write_text("   \n\n")
    (root / "huge.py").write_text("x = 1\n" * 50_000)
    (root / "notes.txt").write_text("not code")
    (root / "skipme").mkdir()
    (root / "skipme" / "a.py").write_text("print('excluded')\n")
    return root


def test_dir_source_rejects_bad_files_with_reasons(tmp_path, messy_tree):
    params = make_params(tmp_path, [{"name": "local", "kind": "dir", "path": str(messy_tree),
                                     "include": ["**/*.py", "**/*.js", "**/*.txt"], "exclude": ["skipme/**"]}],
                         max_file_bytes=100_000)
    summary = run_ingest(params)
    docs = read_docs(tmp_path / "raw")
    assert sorted(docs.column("path").to_pylist()) == ["app.js", "pkg/shlex.py", "pkg/textwrap.py"]
    assert summary["rejected_by_reason"] == {"binary": 1, "empty": 1, "non_utf8": 1, "oversized": 1,
                                             "unknown_language": 1}
    rej = pq.read_table(tmp_path / "rej" / "rejected.parquet")
    assert set(rej.column("stage").to_pylist()) == {"ingest"}
    by_path = dict(zip(rej.column("path").to_pylist(), rej.column("reason").to_pylist()))
    assert by_path["huge.py"] == "oversized" and by_path["blob.py"] == "binary"
    # Hive layout, one directory per language, lang kept in the files.
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == ["lang=javascript", "lang=python", "manifest.json"]
    row = docs.filter(pa.compute.equal(docs.column("path"), "pkg/textwrap.py")).to_pylist()[0]
    text = (STDLIB / "textwrap.py").read_text()
    assert row["id"] == doc_id("local", "pkg/textwrap.py", text)
    assert row["num_lines"] == len(text.splitlines())
    assert row["max_line_len"] == max(len(line) for line in text.splitlines())
    assert list(docs.column_names) == DOC_COLUMNS
    manifest = json.loads((tmp_path / "raw" / "manifest.json").read_text())
    assert manifest["sources"][0]["inputs"] == 8 and len(manifest["sources"][0]["sha256"]) == 64


def test_ingest_is_byte_identical_on_rerun(tmp_path, messy_tree):
    src = [{"name": "local", "kind": "dir", "path": str(messy_tree), "include": ["**/*.py"]}]
    run_ingest(make_params(tmp_path / "a", src))
    run_ingest(make_params(tmp_path / "b", src))
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b
    for rel in files_a:
        if rel.name == "manifest.json":
            continue  # holds the absolute output-independent source path; compared below
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def test_the_stack_parquet_and_jsonl_sources(tmp_path):
    stack = pa.table({
        "content": [(STDLIB / "bisect.py").read_text(), "function f(){return 1}\n", None],
        "lang": ["Python", "JavaScript", "Python"],
        "ext": ["py", "js", "py"],
        "max_stars_repo_path": ["lib/bisect.py", "web/f.js", "lib/none.py"],
        "max_stars_repo_licenses": [["MIT"], ["Apache-2.0"], ["MIT"]],
    })
    pq.write_table(stack, tmp_path / "stack.parquet")
    jsonl = tmp_path / "extra.jsonl"
    jsonl.write_text("\n".join([
        json.dumps({"path": "a.py", "content": "import os\nprint(os.sep)\n"}),
        "{not json",
        json.dumps({"path": "b.py"}),
        json.dumps({"path": "c.c", "content": "int main(void) { return 0; }\n", "lang": "c"}),
    ]) + "\n")
    params = make_params(tmp_path, [
        {"name": "stack", "kind": "parquet", "path": str(tmp_path / "stack.parquet")},
        {"name": "extra", "kind": "jsonl", "path": str(jsonl)},
    ])
    summary = run_ingest(params)
    docs = read_docs(tmp_path / "raw").to_pylist()
    got = sorted((d["source"], d["path"], d["lang"]) for d in docs)
    assert got == [("extra", "a.py", "python"), ("extra", "c.c", "c"),
                   ("stack", "lib/bisect.py", "python"), ("stack", "web/f.js", "javascript")]
    assert summary["rejected_by_reason"] == {"bad_record": 2, "empty": 1}


def test_missing_required_source_is_a_clear_error(tmp_path):
    params = make_params(tmp_path, [{"name": "gone", "kind": "dir", "path": str(tmp_path / "nope")}])
    with pytest.raises(SourceError, match="source 'gone': directory not found"):
        run_ingest(params)


def test_missing_optional_source_is_skipped(tmp_path, messy_tree):
    params = make_params(tmp_path, [
        {"name": "gone", "kind": "dir", "path": str(tmp_path / "nope"), "required": False},
        {"name": "here", "kind": "dir", "path": str(messy_tree), "include": ["pkg/*.py"]},
    ])
    assert run_ingest(params)["documents_by_source"] == {"gone": 0, "here": 2}


def test_split_is_deterministic_and_near_requested_fraction():
    from pipeline.data.records import split_of

    ids = [doc_id("s", f"f{i}.py", str(i)) for i in range(20_000)]
    splits = [split_of(i, 0.05) for i in ids]
    assert splits == [split_of(i, 0.05) for i in ids]
    assert 0.04 < splits.count("val") / len(ids) < 0.06
