"""The regression gate: readable table, non-zero exit on regression, Python API for the RLHF refresh."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from pipeline.eval.compare import compare_reports, tolerance_for

OWNLLM = str(Path(sys.executable).parent / "ownllm")
TOL = {"humaneval.pass@1": 0.0, "fim.infill_exact": 0.02, "fim.next_line_exact": 0.02, "fim.per_lang.*": 0.1}


def write_reports(d: Path, pass1: float, infill: float, next_line: float, py_infill: float | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "humaneval.json").write_text(json.dumps({"pass@1": pass1, "problems": 164, "sandbox": "x"}))
    fim = {"infill_exact": infill, "next_line_exact": next_line, "cases": 100,
           "per_lang": {"python": {"infill_exact": infill if py_infill is None else py_infill, "cases": 60}}}
    (d / "fim.json").write_text(json.dumps(fim))
    (d / "fim_results.jsonl").write_text("{}\n")  # not a report: ignored
    return d


def test_equal_or_better_passes(tmp_path):
    base = write_reports(tmp_path / "base", 0.10, 0.30, 0.20)
    cand = write_reports(tmp_path / "cand", 0.12, 0.29, 0.20)  # infill -0.01 is within 0.02
    cmp = compare_reports(base, cand, TOL)
    assert not cmp.regressed
    status = {r.metric: r.status for r in cmp.rows}
    assert status["humaneval.pass@1"] == "improved" and status["fim.infill_exact"] == "ok"
    assert status["humaneval.problems"] == "info"  # shown, not gated


def test_regression_beyond_tolerance_is_reported(tmp_path):
    base = write_reports(tmp_path / "base", 0.10, 0.30, 0.20)
    cand = write_reports(tmp_path / "cand", 0.09, 0.25, 0.20, py_infill=0.31)
    cmp = compare_reports(base, cand, TOL)
    assert cmp.regressed
    assert sorted(r.metric for r in cmp.regressions) == ["fim.infill_exact", "humaneval.pass@1"]
    table = cmp.table()
    assert "REGRESSED" in table and "fim.infill_exact" in table and "-0.0500" in table
    assert cmp.to_dict()["regressed"] is True


def test_missing_gated_metric_is_a_regression_and_corrupt_reports_are_named(tmp_path):
    base = write_reports(tmp_path / "base", 0.10, 0.30, 0.20)
    cand = write_reports(tmp_path / "cand", 0.10, 0.30, 0.20)
    (cand / "humaneval.json").write_text("{truncated")
    cmp = compare_reports(base, cand, TOL)
    assert [r.metric for r in cmp.regressions] == ["humaneval.pass@1"]
    assert cmp.regressions[0].status == "missing"
    assert "cand/humaneval.json" in cmp.unreadable and "unreadable report" in cmp.table()


def test_lower_is_better_and_patterns(tmp_path):
    assert tolerance_for("fim.per_lang.python.infill_exact", TOL) == 0.1
    assert tolerance_for("fim.infill_exact", {"fim.*": 0.5, "fim.infill_exact": 0.0}) == 0.0
    base, cand = tmp_path / "b", tmp_path / "c"
    for d, ms in ((base, 100.0), (cand, 130.0)):
        d.mkdir()
        (d / "latency.json").write_text(json.dumps({"p50_ms": ms}))
    assert compare_reports(base, cand, {"latency.p50_ms": 20.0}, ["latency.*"]).regressed
    assert not compare_reports(cand, base, {"latency.p50_ms": 20.0}, ["latency.*"]).regressed


def test_cli_exit_codes_and_table(tmp_path):
    out = tmp_path / "reports"
    write_reports(out / "base", 0.10, 0.30, 0.20)
    write_reports(out / "good", 0.10, 0.31, 0.21)
    write_reports(out / "bad", 0.05, 0.30, 0.20)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"data": {"sources": [{"name": "x", "kind": "dir", "path": "."}]},
                                      "eval": {"out": str(out), "tolerances": TOL}}))
    run = lambda *a: subprocess.run([OWNLLM, "eval", "compare", "--params", str(params), *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=120)
    ok = run("base", "good")
    assert ok.returncode == 0, ok.stderr
    assert "humaneval.pass@1" in ok.stdout and "ok:" in ok.stderr
    bad = run("base", str(out / "bad"))
    assert bad.returncode == 1
    assert "REGRESSED" in bad.stdout and "humaneval.pass@1" in bad.stderr
    missing = run("base", "nope")
    assert missing.returncode == 2 and "report directory not found" in missing.stderr
