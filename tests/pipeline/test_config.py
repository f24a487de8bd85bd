import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import ParamsError, load_params, parse_params

REPO = Path(__file__).resolve().parents[2]


def test_repo_params_load_and_resolve_stdlib():
    params = load_params(REPO / "params.yaml")
    stdlib = params.data.sources[0]
    assert stdlib.path == "{stdlib}"
    assert (Path(stdlib.resolved_path()) / "os.py").is_file()


def _write(tmp_path, data) -> Path:
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def _base() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def test_unknown_key_is_named(tmp_path):
    data = _base()
    data["data"]["clean"]["max_avg_line_lenn"] = 3
    with pytest.raises(ParamsError) as exc:
        load_params(_write(tmp_path, data))
    assert "data.clean.max_avg_line_lenn: unknown key" in str(exc.value)


def test_wrong_value_is_named_with_input(tmp_path):
    data = _base()
    data["data"]["dedup"]["threshold"] = "high"
    with pytest.raises(ParamsError) as exc:
        load_params(_write(tmp_path, data))
    msg = str(exc.value)
    assert "data.dedup.threshold" in msg and "'high'" in msg


def test_out_of_range_and_cross_field_checks():
    data = _base()
    data["data"]["dedup"]["threshold"] = 1.5
    with pytest.raises(ParamsError, match="data.dedup.threshold"):
        parse_params(data)
    data = _base()
    data["model"] = {"d_model": 100, "n_heads": 3}
    with pytest.raises(ParamsError, match="not divisible"):
        parse_params(data)


def test_duplicate_source_names_rejected():
    data = _base()
    data["data"]["sources"].append(dict(data["data"]["sources"][0]))
    with pytest.raises(ParamsError, match="repeated: python-stdlib"):
        parse_params(data)


def test_missing_and_unparsable_files(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ParamsError, match="cannot parse"):
        load_params(bad)


def test_cli_reports_params_error_without_traceback(tmp_path):
    data = _base()
    data["seeed"] = 1
    p = _write(tmp_path, data)
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "data", "ingest", "--params", str(p)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert "seeed: unknown key" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_lists_every_stage_group():
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for group in ("data", "tokenizer", "train", "eval", "serve", "feedback", "models", "rlhf", "bisect", "lineage"):
        assert group in proc.stdout, group
