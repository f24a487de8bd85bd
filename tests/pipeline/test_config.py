import os
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


def test_each_package_owns_its_sections():
    """pipeline's schema knows nothing of the layers above; they extend it, and loading composes them all."""
    from feedback.config import FeedbackParams
    from pipeline.config import Params
    from rlhf.config import RLHFParams

    assert not {"serve", "feedback", "rlhf"} & set(Params.model_fields)
    assert set(FeedbackParams.model_fields) - set(Params.model_fields) == {"serve", "feedback"}
    assert set(RLHFParams.model_fields) - set(FeedbackParams.model_fields) == {"rlhf"}
    params = load_params(REPO / "params.yaml")  # pipeline's loader, as every pipeline stage calls it
    assert isinstance(params, RLHFParams)
    assert params.rlhf.gate.heldout_frac == _base()["rlhf"]["gate"]["heldout_frac"]


def test_registered_sections_match_pyproject():
    """The installed `ownllm.params` entry points are pyproject.toml's (a stale install drops sections)."""
    import tomllib
    from importlib.metadata import entry_points

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]["ownllm.params"]
    installed = {ep.name: ep.value for ep in entry_points(group="ownllm.params")}
    assert installed == declared, "reinstall the package (make install) to register its params sections"


@pytest.mark.parametrize("section, key, value, expected", [
    ("rlhf", ("gate", "heldout_fracc"), 0.5, "rlhf.gate.heldout_fracc: unknown key"),
    ("rlhf", ("gate", "heldout_frac"), 1.5, "rlhf.gate.heldout_frac: Input should be less than 1 (got 1.5)"),
    ("serve", ("port",), 0, "serve.port: Input should be greater than or equal to 1 (got 0)"),
    ("feedback", ("simulate", "userz"), 2, "feedback.simulate.userz: unknown key"),
])
def test_upper_layer_sections_name_the_key(tmp_path, section, key, value, expected):
    data = _base()
    node = data[section]
    for k in key[:-1]:
        node = node.setdefault(k, {})
    node[key[-1]] = value
    with pytest.raises(ParamsError) as exc:
        load_params(_write(tmp_path, data))
    assert expected in str(exc.value)


def test_cli_names_an_upper_layer_key_from_a_pipeline_stage(tmp_path):
    """A pipeline stage run through the CLI validates the rlhf section too (the whole file, one error)."""
    data = _base()
    data["rlhf"]["gate"]["cursors_per_fil"] = 3
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "data", "ingest", "--params",
                           str(_write(tmp_path, data))], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert "rlhf.gate.cursors_per_fil: unknown key" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_sibling_extensions_compose():
    """Two packages extending pipeline's schema independently both take part in one schema."""
    from pydantic import Field, ValidationError

    from pipeline.config import Params, Section, _compose

    class AlphaConfig(Section):
        size: int = Field(1, ge=1)

    class AlphaParams(Params):
        alpha: AlphaConfig = AlphaConfig()

    class BetaParams(Params):
        beta: dict[str, int] = {}

    schema = _compose((AlphaParams, Params, BetaParams))
    pipeline_only = {k: v for k, v in _base().items() if k in Params.model_fields}
    params = schema.model_validate({**pipeline_only, "alpha": {"size": 3}, "beta": {"x": 1}})
    assert isinstance(params, AlphaParams) and isinstance(params, BetaParams)
    assert (params.alpha.size, params.beta) == (3, {"x": 1})
    with pytest.raises(ValidationError) as exc:
        schema.model_validate({**pipeline_only, "alpha": {"size": 0}, "gamma": 1})
    assert {(".".join(map(str, e["loc"])), e["type"]) for e in exc.value.errors()} == {
        ("alpha.size", "greater_than_equal"), ("gamma", "extra_forbidden")}


def test_an_install_without_the_params_entry_points_says_so(tmp_path):
    """Metadata from before the split (no `ownllm.params` group): the upper sections are unknown, and the
    error says which install step is missing instead of only calling `serve` a typo."""
    meta = tmp_path / "meta" / "ownllm-0.1.0.dist-info"
    meta.mkdir(parents=True)
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: ownllm\nVersion: 0.1.0\n")
    (meta / "entry_points.txt").write_text("[ownllm.commands]\ndata = pipeline.data.cli:register\n")
    env = {**os.environ, "PYTHONPATH": f"{meta.parent}{os.pathsep}{REPO}"}
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "data", "ingest", "--params", str(REPO / "params.yaml")],
                          capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 2, proc.stderr
    assert "serve: unknown key (no ownllm.params entry point is installed" in proc.stderr
    assert "Traceback" not in proc.stderr
