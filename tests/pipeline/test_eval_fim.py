"""FIM and next-line evaluation on held-out code: prompt format, split, cursor choice, determinism."""

from __future__ import annotations

import json
import shutil

import pytest

from pipeline.config import parse_params
from pipeline.data.records import DOC_SCHEMA, make_doc, split_of, to_table, write_docs
from pipeline.eval.fim import cursor_case, exact, generated_line, validation_docs, normalise, run_fim, select_cases
from tests.conftest import stdlib_files

PY_FILES = ["textwrap.py", "shlex.py", "fnmatch.py", "glob.py", "bisect.py", "heapq.py", "colorsys.py", "keyword.py",
            "string.py", "numbers.py", "reprlib.py", "copy.py", "queue.py", "sched.py", "stat.py", "token.py",
            "tabnanny.py", "this.py", "nturl2path.py", "opcode.py"]
JS = {f"lib/m{i}.js": f"'use strict';\nfunction add{i}(a, b) {{\n  const total = a + b + {i};\n  return total;\n}}\n"
                      f"module.exports = {{ add{i} }};\n" for i in range(12)}


@pytest.fixture()
def params(tmp_path):
    docs = [make_doc("stdlib", name, "python", text) for name, text in stdlib_files(PY_FILES).items()]
    docs += [make_doc("js", name, "javascript", text) for name, text in JS.items()]
    write_docs(to_table(docs, DOC_SCHEMA), tmp_path / "dedup")
    return parse_params({
        "data": {"sources": [{"name": "x", "kind": "dir", "path": str(tmp_path)}],
                 "dedup": {"out": str(tmp_path / "dedup")}},
        "shards": {"val_frac": 0.5},
        "eval": {"out": str(tmp_path / "reports"), "fim": {"max_docs": 4, "max_new_tokens": 12, "batch_size": 8}},
    })


def test_validation_docs_are_exactly_the_validation_split(params):
    docs = validation_docs(params)
    assert docs and all(split_of(d["id"], 0.5) == "val" for d in docs)
    from pipeline.data.records import read_docs

    all_ids = read_docs(params.data.dedup.out, columns=["id"]).column("id").to_pylist()
    assert {d["id"] for d in docs} == {i for i in all_ids if split_of(i, 0.5) == "val"}
    assert [(d["lang"], d["id"]) for d in docs] == sorted((d["lang"], d["id"]) for d in docs)


def test_cursor_choice_is_deterministic_and_exact(params):
    doc = validation_docs(params)[0]
    a, b = cursor_case(doc, 7, 4), cursor_case(doc, 7, 4)
    assert a == b
    assert a.line_no > 0 and a.prefix + "\n" + a.target + a.suffix == doc["content"]
    assert not a.prefix.endswith("\n")  # the cursor is at the end of the previous line
    assert len(a.target.strip()) >= 4
    lines = {cursor_case(doc, seed, 4).line_no for seed in range(20)}
    assert len(lines) > 1  # the seed matters


def test_cases_per_language_and_skips_are_counted(params):
    docs = validation_docs(params)
    docs.append({"id": "x1", "lang": "python", "path": "p.py", "content": "a\nb\n"})
    docs.append({"id": "x2", "lang": "python", "path": "q.py", "content": "x = '<|endoftext|>'\n"})
    cases, skipped = select_cases(sorted(docs, key=lambda d: (d["lang"], d["id"])), 7, 4, max_docs=100)
    assert skipped == {"no_line_long_enough": 1, "contains_special_token": 1}
    assert {c.lang for c in cases} == {"python", "javascript"}
    capped, _ = select_cases(docs, 7, 4, max_docs=2)
    assert sum(c.lang == "python" for c in capped) == 2


def test_normalise_whitespace_and_line_extraction():
    assert normalise("    return  a +\tb  ") == normalise("return a + b")
    assert normalise("return a+b") != normalise("return a + b")
    assert exact(generated_line("\n    return  x"), "    return x")
    assert not exact(generated_line("    return x"), "    return x")  # continued the previous line: no match
    assert generated_line("\n") == ""


def test_run_fim_reports_per_language_and_is_byte_identical(params, tiny_model_dir):
    summary = run_fim(params, "tiny", str(tiny_model_dir))
    out = params.eval.out + "/tiny"
    report = open(out + "/fim.json").read()
    assert set(summary["per_lang"]) == {"python", "javascript"}
    assert summary["cases"] == sum(v["cases"] for v in summary["per_lang"].values())
    for key in ("infill_exact", "next_line_exact"):
        assert 0.0 <= summary[key] <= 1.0
    rows = [json.loads(line) for line in open(out + "/fim_results.jsonl")]
    assert len(rows) == summary["cases"] and all("\n" not in r["infill"].lstrip("\n") for r in rows)
    assert sum(r["infill_exact"] for r in rows) == round(summary["infill_exact"] * len(rows))
    shutil.rmtree(out)
    run_fim(params, "tiny", str(tiny_model_dir))
    assert open(out + "/fim.json").read() == report


def test_missing_dedup_dataset_is_a_clear_error(tmp_path):
    params = parse_params({"data": {"sources": [{"name": "x", "kind": "dir", "path": "."}],
                                    "dedup": {"out": str(tmp_path / "nowhere")}}})
    with pytest.raises(FileNotFoundError, match="nowhere"):
        validation_docs(params)
