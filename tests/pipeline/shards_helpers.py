"""Small real corpora (stdlib Python, the interpreter's C headers) and params for tokenizer/shards tests."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import yaml

from pipeline.config import Params, load_params
from pipeline.data.records import DOC_SCHEMA, make_doc, to_table, write_docs

STDLIB = Path(sysconfig.get_paths()["stdlib"])
INCLUDE = Path(sysconfig.get_paths()["include"])
PY_FILES = ["textwrap.py", "shlex.py", "fnmatch.py", "glob.py", "bisect.py", "heapq.py", "colorsys.py", "keyword.py",
            "string.py", "numbers.py", "reprlib.py", "copy.py", "queue.py", "sched.py", "graphlib.py", "operator.py",
            "tokenize.py", "difflib.py", "json/encoder.py", "json/decoder.py", "csv.py", "calendar.py", "pprint.py",
            "dataclasses.py", "functools.py"]
C_FILES = ["Python.h", "object.h", "listobject.h", "dictobject.h", "longobject.h", "pymem.h", "abstract.h"]


def unicode_tabs_doc() -> str:
    """Real code made hostile: tab indentation, CRLF lines, emoji/CJK/RTL/combining marks, a zero-width joiner."""
    src = (STDLIB / "textwrap.py").read_text(encoding="utf-8")
    lines = [line.replace("    ", "\t") for line in src.splitlines()[:120]]
    odd = ['s = "naïve café — 漢字 かな 한국어 😀👩‍💻 \u202eRTL\u202c e\u0301 \u00a0nbsp \U0001f9ea"',
           "\tx = '\\t\\x00'  # ∀x∈ℝ: x² ≥ 0", "\t\t\t\t\tdeep = 1", "\u3000ideographic_space = 2", ""]
    return "\r\n".join(odd + lines) + "\n\u2028end"


def stdlib_docs(extra: list[tuple[str, str, str]] = ()) -> list[dict]:
    docs = [make_doc("stdlib", n, "python", (STDLIB / n).read_text(encoding="utf-8")) for n in PY_FILES]
    docs += [make_doc("include", n, "c", (INCLUDE / n).read_text(encoding="utf-8")) for n in C_FILES if (INCLUDE / n).is_file()]
    docs.append(make_doc("synthetic", "odd/unicode_tabs.py", "python", unicode_tabs_doc()))
    docs += [make_doc("planted", path, lang, content) for path, lang, content in extra]
    return docs


def write_corpus(root: Path, docs: list[dict]) -> Path:
    out = root / "dedup"
    write_docs(to_table(docs, DOC_SCHEMA), out)
    return out


def make_params(root: Path, **sections) -> Params:
    """A params file under ``root`` with every output under ``root``; ``sections`` override/extend."""
    data = {
        "seed": 1234,
        "tracking": {"wandb_mode": "disabled", "reports_dir": str(root / "reports")},
        "data": {"sources": [{"name": "stdlib", "kind": "dir", "path": "{stdlib}"}], "dedup": {"out": str(root / "dedup")}},
        "tokenizer": {"out": str(root / "tokenizer"), "vocab_size": 1024, "sample_docs": 24, "reserved_tokens": 4},
        "decontam": {"rejected": str(root / "rejected" / "decontam")},
        "shards": {"out": str(root / "shards"), "max_seq_len": 128, "val_frac": 0.2,
                   "exclude_ids": str(root / "exclude_ids.txt"), "encode_batch_docs": 8},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    exclude = Path(data["shards"]["exclude_ids"])
    if not exclude.exists():
        exclude.write_text("# nothing excluded\n", encoding="utf-8")
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=True), encoding="utf-8")
    return load_params(path)
