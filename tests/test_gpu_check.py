"""The GPU check's parts that run anywhere: the kit's size and pin check, run.sh's argument handling and fast
failures, the params it trains, and (end to end, on this venv's torch) the results file of the tiny profile.

The rehearsal on the GPU box's own package set (torch 2.11, transformers 5.x, the kit installed with
``pip --target``) is ``make gpu-rehearsal``: a few GB of venv, so a documented command, not a test.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import parse_params

REPO = Path(__file__).resolve().parents[1]
GPU = REPO / "benchmarks" / "gpu"
RUN_SH = GPU / "run.sh"
MIB = 1024 * 1024


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"gpu_{name}", GPU / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


kit = load("kit")
check = load("check")


# ------------------------------------------------------------------------------------------------ the kit
def make_kit(tmp_path: Path, wheels: dict[str, int]) -> Path:
    d = tmp_path / "kit"
    d.mkdir()
    for name, size in wheels.items():
        with open(d / name, "wb") as f:
            f.truncate(size)  # sparse: the check reads sizes, not contents
    return d


PINS = "# a comment\nfoo-bar==1.0\nbaz==2.3.1  # why\n"
GOOD = {"foo_bar-1.0-py3-none-any.whl": 3 * MIB, "baz-2.3.1-cp312-cp312-manylinux2014_x86_64.whl": 1 * MIB}


def run_kit(tmp_path: Path, kit_dir: Path, project_bytes: int, limit: float = 64) -> subprocess.CompletedProcess:
    pins = tmp_path / "pins.txt"
    pins.write_text(PINS)
    return subprocess.run([sys.executable, str(GPU / "kit.py"), "check", "--kit", str(kit_dir), "--pins", str(pins),
                           "--project-bytes", str(project_bytes), "--limit-mib", str(limit)],
                          capture_output=True, text=True)


def test_kit_check_accepts_the_pinned_wheels_and_reports_the_headroom(tmp_path):
    res = run_kit(tmp_path, make_kit(tmp_path, GOOD), project_bytes=2 * MIB, limit=10)
    assert res.returncode == 0, res.stderr
    assert "2 wheels, 4.0 MiB; project 2.0 MiB; 4.0 MiB left of 10 MiB" in res.stdout


def test_kit_check_fails_when_kit_and_project_exceed_the_carry_limit(tmp_path):
    res = run_kit(tmp_path, make_kit(tmp_path, GOOD), project_bytes=7 * MIB, limit=10)
    assert res.returncode == 1
    assert "the kit is 4.0 MiB but only 3.0 MiB may travel (10 MiB carry limit - 7.0 MiB of project)" in res.stderr


def test_kit_check_names_missing_wrong_and_stale_wheels(tmp_path):
    wheels = {"baz-2.3.0-py3-none-any.whl": 10, "old-0.1-py3-none-any.whl": 10}
    res = run_kit(tmp_path, make_kit(tmp_path, wheels), project_bytes=0)
    assert res.returncode == 1
    assert "missing: foo-bar==1.0" in res.stderr
    assert "baz-2.3.0-py3-none-any.whl is not the pinned baz==2.3.1" in res.stderr
    assert "old-0.1-py3-none-any.whl" in res.stderr and "stale" in res.stderr


def test_kit_check_without_a_kit_says_how_to_make_one(tmp_path):
    res = run_kit(tmp_path, tmp_path / "absent", project_bytes=0)
    assert res.returncode == 1 and "run `make gpu-kit` first" in res.stderr


def test_kit_pins_are_exact_and_shadow_only_what_the_box_has_too_new():
    pins = kit.read_pins()
    _, on_box = kit.device_packages()
    # The kit carries what the box lacks; of what the box has, only the versions it has too new for
    # streaming / Composer 0.32 (transformers 5, tokenizers 0.23, huggingface_hub 1.x).
    assert set(pins) & on_box == {"transformers", "tokenizers", "huggingface-hub"}
    assert {"mosaicml", "mosaicml-streaming", "pydantic", "detect-secrets"} <= set(pins)
    assert pins["transformers"].startswith("4.")


def test_project_size_counts_what_travels():
    size = kit.project_bytes()
    assert 100_000 < size < 16 * MIB  # tracked + untracked-not-ignored files; .venv and data are ignored


# ------------------------------------------------------------------------------------------------ run.sh
def run_sh(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(RUN_SH), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_run_sh_without_out_prints_usage():
    res = run_sh()
    assert res.returncode == 2 and "usage: bash benchmarks/gpu/run.sh" in res.stderr


def test_run_sh_rejects_an_unknown_profile(tmp_path):
    res = run_sh("--profile", "tpu", str(tmp_path / "out"))
    assert res.returncode == 2 and "unknown profile 'tpu'" in res.stderr


def test_run_sh_gpu_profile_fails_fast_without_nvidia_smi(tmp_path):
    res = run_sh(str(tmp_path / "out"), env={"NVIDIA_SMI": str(tmp_path / "no-nvidia-smi")})
    assert res.returncode == 3 and "nvidia-smi not found" in res.stderr


def test_run_sh_refuses_a_python_the_kit_was_not_built_for(tmp_path):
    if sys.version_info[:2] == (3, 12):
        pytest.fail("this test assumes the project's Python 3.11 venv (the kit is cp312)")
    res = run_sh("--profile", "tiny", str(tmp_path / "out"), env={"PYTHON": sys.executable})
    assert res.returncode == 3 and "the kit is built for CPython 3.12" in res.stderr


# ---------------------------------------------------------------------------------------------- check.py
@pytest.mark.parametrize("profile", sorted(check.PROFILES))
def test_both_runs_train_the_same_validated_params(tmp_path, profile):
    cfg = check.PROFILES[profile]["check"]
    a, b = (check.build_params(profile, tmp_path, run, cfg) for run in ("a", "b"))
    pa, pb = parse_params(a), parse_params(b)  # the schema of params.yaml accepts both
    assert pa.train.max_duration == f"{cfg['steps']}ba" and pa.train.save_interval == f"{cfg['checkpoint_step']}ba"
    assert pa.tracking.wandb_mode == "disabled" and not pa.decontam.enabled
    # Runs a and b differ only where they write: fields the run fingerprint leaves out.
    from pipeline.train.trainer import NON_TRAJECTORY_FIELDS

    ta, tb = pa.train.model_dump(), pb.train.model_dump()
    differing = {k for k in ta if ta[k] != tb[k]}
    assert differing and differing <= NON_TRAJECTORY_FIELDS | {"run_name"}
    assert pa.model == pb.model and pa.shards == pb.shards and pa.tokenizer == pb.tokenizer


def test_gpu_profile_keeps_the_125m_model_bf16_and_seq_2048(tmp_path):
    p = parse_params(check.build_params("gpu", tmp_path, "a", check.PROFILES["gpu"]["check"]))
    assert (p.model.n_layers, p.model.d_model, p.model.n_heads) == (12, 768, 12)
    assert p.shards.max_seq_len == p.model.max_seq_len == 2048 and p.tokenizer.vocab_size == 32768
    assert p.train.precision == "amp_bf16" and p.train.device == "gpu"


def test_loss_comparison_tells_bit_identical_from_close():
    a = {0: "2.5", 1: "2.25", 2: "2.0"}
    same = check.compare(a, dict(a), [0, 1, 2])
    assert same["bit_identical"] and same["max_abs_diff"] == 0 and same["first_differing_step"] is None
    near = check.compare(a, {**a, 1: "2.2500001"}, [0, 1, 2])
    assert not near["bit_identical"] and near["first_differing_step"] == 1
    assert near["max_abs_diff"] == pytest.approx(1e-7)


def test_monitor_summary_uses_the_steady_state_and_both_peaks():
    records = [{"step": s, "metrics": {"throughput/device/flops_per_sec": 1e12 if s < 3 else 395e12,
                                       "throughput/tokens_per_sec": 100.0 * s,
                                       "throughput/device/mfu": 395e12 / 989.5e12,
                                       "memory/peak_allocated_mem": 10.0 + s}} for s in range(1, 21)]
    m = check.monitor_summary(records, {"steps": 20}, "gpu")
    assert m["device_flops_per_s"] == 395e12  # start-up windows left out
    assert m["mfu_vs_measured_peak"] == pytest.approx(0.5) and m["mfu_target_met"] is True
    assert m["peak_allocated_gb"] == 30.0
    assert check.monitor_summary(records, {"steps": 20}, "tiny")["mfu_vs_measured_peak"] is None


@pytest.mark.slow
def test_tiny_check_end_to_end_writes_complete_results(tmp_path, tiny_model_dir):
    """run.sh --no-kit on this venv: carried data (a real tokenizer and real MDS shards), train, SIGKILL,
    resume, compare, export, latency through LocalBackend; results.json holds every field it promises."""
    from tests.pipeline.train_helpers import TRAIN_FILES, VAL_FILES, read, write_shards

    data = tmp_path / "data"
    (data / "tokenizer").mkdir(parents=True)
    for f in tiny_model_dir.iterdir():
        if "token" in f.name or f.name == "special_tokens_map.json":
            (data / "tokenizer" / f.name).write_bytes(f.read_bytes())
    write_shards(data / "shards" / "train", read(TRAIN_FILES), data / "tokenizer", seq_len=128)
    write_shards(data / "shards" / "val", read(VAL_FILES), data / "tokenizer", seq_len=128)

    out = tmp_path / "out"
    # 24 steps: the kill (after step 5) must land before the last checkpoint; with 8 steps of ~0.4 s a loss.csv
    # polled every 0.2 s was sometimes first seen past step 5 only at step 8, and b "resumed" from its end.
    res = run_sh("--profile", "tiny", "--no-kit", str(out), "--data", str(data), "--steps", "24",
                 "--checkpoint-step", "3", "--latency-requests", "2",
                 env={"PYTHON": sys.executable, "PYTHONPATH": str(REPO)}, timeout=600)
    results = json.loads((out / "results.json").read_text())
    assert res.returncode == 0, (results.get("failed"), res.stdout[-2000:], res.stderr[-2000:])
    assert check.validate_results(results) == []
    assert results["ok"] and results["data"]["source"] == "carried"
    resume = results["resume"]
    assert 3 <= resume["resumed_from_step"] < 24 and resume["resumed_from_step"] % 3 == 0
    assert resume["after_resume"]["bit_identical"]
    assert resume["two_runs"]["bit_identical"] and len(resume["losses_a"]) == 24
    assert results["train_b"]["killed_after_step"] >= 5
    assert results["export"]["params"] > 0 and results["latency"]["p50_ms"] > 0
    assert results["train_a"]["monitors"]["tokens_per_s"] > 0
    assert {p.name for p in out.iterdir()} <= {"results.json", "check.log", "data.log", "train-a.log",
                                                "train-b.log", "export.log"}
