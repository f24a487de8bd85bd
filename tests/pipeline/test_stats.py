"""`ownllm data stats` on a small real dataset: values, rejections, determinism of JSON and PNGs."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import yaml

from pipeline.config import ParamsError, parse_params
from pipeline.data import stats
from pipeline.data.records import DOC_SCHEMA, make_doc, reject, to_table, write_docs, write_rejected
from tests.conftest import REPO, stdlib_files

PY = ["heapq.py", "bisect.py", "glob.py", "shlex.py", "textwrap.py", "colorsys.py"]


@pytest.fixture()
def dataset(tmp_path):
    """data/raw and data/dedup with two sources and two languages, plus two stages' rejections."""
    files = stdlib_files(PY)
    docs = [make_doc("stdlib", p, "python", t) for p, t in files.items()]
    docs.append(make_doc("snippets", "clamp.js", "javascript", "export const clamp = (x, a, b) => Math.min(b, Math.max(a, x));\n"))
    docs.append(make_doc("snippets", "util.py", "python", "def f(x):\n    return x + 1\n"))
    write_docs(to_table(docs, DOC_SCHEMA), tmp_path / "raw")
    write_docs(to_table(docs[:-1], DOC_SCHEMA), tmp_path / "dedup")
    write_rejected([reject(docs[-1], "dedup", "near_duplicate", docs[0]["id"])], tmp_path / "rejected" / "dedup")
    write_rejected([reject({"source": "stdlib", "path": "blob.py", "lang": "python"}, "ingest", "binary"),
                    reject({"source": "stdlib", "path": "e.py", "lang": "python"}, "ingest", "empty"),
                    reject({"source": "stdlib", "path": "f.py", "lang": "python"}, "ingest", "empty")],
                   tmp_path / "rejected" / "ingest")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["stats"].update(
        out=str(tmp_path / "reports" / "data"), input=str(tmp_path / "dedup"),
        funnel={"raw": str(tmp_path / "raw"), "clean": str(tmp_path / "clean"), "dedup": str(tmp_path / "dedup")},
        rejected=[str(tmp_path / "rejected" / s) for s in ("ingest", "clean", "dedup")])
    params["tracking"]["reports_dir"] = str(tmp_path / "reports")
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return tmp_path, path, docs


def test_stats_values_per_language_source_and_stage(dataset):
    root, path, docs = dataset
    assert stats.main(argparse.Namespace(params=str(path))) == 0
    out = json.loads((root / "reports" / "data" / "stats.json").read_text())
    kept = docs[:-1]
    assert out["total"]["documents"] == len(kept)
    assert out["total"]["bytes"] == sum(d["size_bytes"] for d in kept)
    assert out["total"]["lines"] == sum(d["num_lines"] for d in kept)
    assert set(out["by_lang"]) == {"javascript", "python"} and set(out["by_source"]) == {"snippets", "stdlib"}
    py = [d for d in kept if d["lang"] == "python"]
    sizes = np.array([d["size_bytes"] for d in py], dtype=float)
    dist = out["by_lang"]["python"]["file_size_bytes"]
    assert dist == {"p50": round(float(np.percentile(sizes, 50)), 4), "p90": round(float(np.percentile(sizes, 90)), 4),
                    "p99": round(float(np.percentile(sizes, 99)), 4), "max": float(sizes.max())}
    assert out["by_lang"]["python"]["max_line_len"]["max"] == max(d["max_line_len"] for d in py)
    assert 0 < out["by_source"]["stdlib"]["alnum_frac"]["p50"] < 1
    # The funnel leaves out the stage that has not run; rejections are per stage and reason.
    assert out["funnel"] == {"raw": {"documents": 8, "by_lang": {"javascript": 1, "python": 7}},
                             "dedup": {"documents": 7, "by_lang": {"javascript": 1, "python": 6}}}
    assert out["rejected"]["ingest"]["by_reason"] == {"binary": 1, "empty": 2}
    assert out["rejected"]["dedup"] == {"total": 1, "by_reason": {"near_duplicate": 1}, "by_lang": {"python": 1}}
    csv = (root / "reports" / "data" / "rejections.csv").read_text()
    assert csv == "reason,count\ndedup/near_duplicate,1\ningest/binary,1\ningest/empty,2\n"


def test_json_and_plots_are_byte_identical_on_rerun(dataset):
    root, path, _ = dataset
    report = root / "reports" / "data"
    runs = []
    for _ in range(2):
        assert stats.main(argparse.Namespace(params=str(path))) == 0
        runs.append({p.name: p.read_bytes() for p in sorted(report.rglob("*")) if p.is_file()})
    assert runs[0] == runs[1]
    assert {"stats.json", "rejections.csv", "distributions.png", "funnel.png", "rejections.png"} <= set(runs[0])
    for name in ("distributions.png", "funnel.png", "rejections.png"):
        png = runs[0][name]
        assert png.startswith(b"\x89PNG") and len(png) > 5000
        assert b"Software" not in png and b"matplotlib" not in png  # no version stamp in the file


def test_missing_input_is_a_clear_error_and_bad_percentiles_are_rejected(dataset, tmp_path):
    from pipeline.cli import UserError

    _, path, _ = dataset
    params = yaml.safe_load(path.read_text())
    params["data"]["stats"]["input"] = str(tmp_path / "nowhere")
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(UserError, match="nowhere"):
        stats.main(argparse.Namespace(params=str(path)))
    params["data"]["stats"]["percentiles"] = [50, 150]
    with pytest.raises(ParamsError, match="percentiles"):
        parse_params(params)


def test_an_empty_dataset_gives_counts_of_zero_and_still_plots(tmp_path):
    write_docs(DOC_SCHEMA.empty_table(), tmp_path / "dedup")
    (tmp_path / "dedup" / "lang=python").mkdir(parents=True)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["stats"].update(out=str(tmp_path / "out"), input=str(tmp_path / "dedup"), funnel={}, rejected=[])
    result = stats.run_stats(parse_params(params))
    assert result["total"]["documents"] == 0 and result["by_lang"] == {} and result["rejected"] == {}
    assert len(list((tmp_path / "out" / "plots").glob("*.png"))) == 3
