"""Pretraining: determinism, data recovery, skip ranges, resume after SIGKILL, 2-process gloo training."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_helpers import tiny_params, write_params

from pipeline.config import parse_params

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def curve(run_dir: Path) -> list[dict]:
    with (run_dir / "reports/train/loss.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def batch_log(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "reports/train/batches.jsonl").read_text().splitlines()]


def ownllm(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "OWNLLM_WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_training_learns_and_reports(trained_run):
    s, d = trained_run["summary"], trained_run["dir"]
    rows = curve(d)
    assert [int(r["step"]) for r in rows] == list(range(12))
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"]) - 0.1
    report = json.loads((d / "reports/train.json").read_text())
    assert report["steps"] == 12 and report["tokens_seen"] == 12 * 4 * 64
    assert report["val_loss"] > 0 and report["val_perplexity"] > 1 and report["unigram_entropy"] > 0
    assert report["objectives"]["fim_rate"] == 0.5 and 0 < report["objectives"]["fim_fraction_seen"] < 1
    assert "tokens_per_second" not in json.dumps(report)  # timings stay out of the DVC metrics file
    assert json.loads((d / "reports/train/speed.json").read_text())["tokens_per_second"] > 0
    assert (d / "artifacts/train/final/model.safetensors").is_file()
    assert json.loads((d / "reports/train/spikes.json").read_text()) == []
    val = list(csv.DictReader((d / "reports/train/val_loss.csv").open()))
    assert [int(r["step"]) for r in val] == [6, 12]


def test_training_reads_the_shards_without_writing_into_them(trained_run, shards_dir):
    # data/shards is a DVC output: streaming must decompress into the cache, never next to the .zstd files.
    for split in ("train", "val"):
        names = sorted(p.name for p in (shards_dir / split).iterdir())
        assert names[0] == "index.json" and all(n.endswith(".mds.zstd") for n in names[1:]), names
    copies = sorted(p.name for p in (trained_run["dir"] / "shard-cache").iterdir() if p.is_dir())
    assert [c.split("-")[0] for c in copies] == ["train", "val"]


def test_two_runs_are_bit_identical(trained_run, tmp_path, shards_dir, tiny_model_dir):
    from pipeline.train.trainer import train

    data = tiny_params(tmp_path, shards_dir, tiny_model_dir)
    train(parse_params(data))
    a, b = trained_run["dir"], tmp_path
    assert curve(a) == curve(b)  # loss bit for bit (repr of the float)
    assert batch_log(a) == batch_log(b)
    assert (a / "artifacts/train/final/model.safetensors").read_bytes() == \
        (b / "artifacts/train/final/model.safetensors").read_bytes()
    ra, rb = (json.loads((x / "reports/train.json").read_text()) for x in (a, b))
    ra.pop("checkpoints"), rb.pop("checkpoints")
    assert ra == rb


def test_recovered_batches_equal_what_training_saw(trained_run):
    from pipeline.train.batchlog import sample_digests
    from pipeline.train.data import batches_for_steps

    log = batch_log(trained_run["dir"])
    steps = [0, 5, 11, 3]
    recovered = batches_for_steps(trained_run["params"], steps)
    for step, rec in zip(steps, recovered):
        seen = log[step]
        assert seen["step"] == step == rec.step
        assert rec.sample_idx == seen["samples"]
        assert rec.doc_ids == seen["doc_ids"]
        assert sample_digests(rec.batch["input_ids"]) == seen["input_sha"]  # same tokens, FIM included
    assert len({tuple(x["samples"]) for x in log}) == len(log)  # and steps really differ


def test_rerunning_a_finished_run_leaves_its_curves_unchanged(tmp_path, shards_dir, tiny_model_dir):
    """`dvc repro` after a code-only change re-runs `ownllm train`, which autoresumes the finished run: the
    curves DVC tracks must come out byte for byte the same (the last evaluation was once logged twice)."""
    from pipeline.train.trainer import train

    params = parse_params(tiny_params(tmp_path, shards_dir, tiny_model_dir, max_duration="6ba", eval_interval="3ba"))
    train(params)
    reports = tmp_path / "reports/train"
    first = {n: (reports / n).read_bytes() for n in ("loss.csv", "val_loss.csv", "batches.jsonl")}
    train(params)
    assert {n: (reports / n).read_bytes() for n in first} == first
    assert [r.split(",")[0] for r in first["val_loss.csv"].decode().splitlines()] == ["step", "3", "6"]


def test_three_objective_mix_is_trained_logged_and_recoverable(tmp_path, shards_dir, tiny_model_dir):
    """Span corruption as the third objective: the real trainer runs it, the run's metrics record the mix,
    and a step's batch recovered from params alone is the one training saw."""
    from pipeline.train.batchlog import sample_digests
    from pipeline.train.data import batches_for_steps
    from pipeline.train.trainer import train

    data = tiny_params(tmp_path, shards_dir, tiny_model_dir, max_duration="6ba", fim_rate=0.3,
                       span_corruption_rate=0.4, eval_interval="6ba")
    params = parse_params(data)
    train(params)
    obj = json.loads((tmp_path / "reports/train.json").read_text())["objectives"]
    log = batch_log(tmp_path)
    assert obj["span_corruption_rate"] == 0.4 and abs(obj["next_token_rate"] - 0.3) < 1e-9
    assert obj["span_docs_seen"] == sum(r["span_docs"] for r in log) > 0
    assert obj["fim_docs_seen"] == sum(r["fim_docs"] for r in log) > 0
    assert 0.15 < obj["span_fraction_seen"] < 0.65 and 0.05 < obj["fim_fraction_seen"] < 0.55
    for rec in batches_for_steps(params, [0, 4]):
        assert sample_digests(rec.batch["input_ids"]) == log[rec.step]["input_sha"]


def test_skip_steps_withhold_updates_but_keep_data_position(trained_run, tmp_path, shards_dir, tiny_model_dir):
    import torch

    from pipeline.train.trainer import checkpoint_dir, train

    data = tiny_params(tmp_path, shards_dir, tiny_model_dir, skip_steps=[[4, 7]], max_duration="9ba",
                       eval_interval="100ba", save_interval="1ba", save_num_checkpoints_to_keep=-1)
    params = parse_params(data)
    s = train(params)
    assert s["skip_steps"] == [[4, 7]] and s["skipped_batches"] == 3
    got = curve(tmp_path)
    assert [r["skipped"] for r in got] == ["0"] * 4 + ["1"] * 3 + ["0"] * 2
    # The data position is unchanged: step n still reads the batch of step n.
    assert [x["samples"] for x in batch_log(tmp_path)] == [x["samples"] for x in batch_log(trained_run["dir"])[:9]]

    def weights(batches: int) -> dict:
        ckpt = torch.load(checkpoint_dir(params) / f"ep0-ba{batches}-rank0.pt", weights_only=False)
        return ckpt["state"]["model"]

    def same(a: dict, b: dict) -> bool:
        return all(torch.equal(a[k], b[k]) for k in a)

    w4 = weights(4)
    assert not same(weights(3), w4)  # a trained step moves the weights ...
    assert all(same(w4, weights(n)) for n in (5, 6, 7))  # ... the skipped steps 4, 5, 6 do not
    assert not same(w4, weights(8))  # and training goes on after the range


def test_cli_overrides_skip_steps_and_rejects_bad_ranges(tmp_path, shards_dir, tiny_model_dir):
    from pipeline.cli import main

    p = write_params(tmp_path / "params.yaml", tiny_params(tmp_path, shards_dir, tiny_model_dir))
    assert main(["train", "--params", str(p), "--skip-steps", "5:3"]) == 2


def test_resume_after_sigkill_gives_the_same_losses(tmp_path, shards_dir, tiny_model_dir):
    from pipeline.train.trainer import train

    over = dict(max_duration="150ba", save_interval="20ba", eval_interval="1000ba", warmup="10ba")
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    train(parse_params(tiny_params(ref_dir, shards_dir, tiny_model_dir, **over)))

    params = write_params(tmp_path / "params.yaml", tiny_params(run_dir, shards_dir, tiny_model_dir, **over))
    proc = ownllm("train", "--params", str(params))
    loss_csv = run_dir / "reports/train/loss.csv"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if loss_csv.exists() and len(loss_csv.read_text().splitlines()) > 1 + 45:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run was not killed mid-way:\n{proc.stdout.read()[-3000:]}"
    rows_at_kill = len(curve(run_dir))
    assert 45 <= rows_at_kill < 150

    again = ownllm("train", "--params", str(params))
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out[-3000:]
    speed = json.loads((run_dir / "reports/train/speed.json").read_text())
    assert 20 <= speed["resumed_from_step"] <= rows_at_kill  # it resumed from a checkpoint, not from scratch
    assert curve(run_dir) == curve(ref_dir)  # every step, including those after the kill, bit for bit
    assert batch_log(run_dir) == batch_log(ref_dir)


def test_two_process_gloo_keeps_the_global_batch(trained_run, tmp_path, shards_dir, tiny_model_dir):
    import shutil

    # A private copy: streaming keys its shared memory by directory, and this test process still holds some.
    shutil.copytree(shards_dir, tmp_path / "shards")
    data = tiny_params(tmp_path, tmp_path / "shards", tiny_model_dir, max_duration="6ba", eval_interval="1000ba")
    params = write_params(tmp_path / "params.yaml", data)
    proc = ownllm("train", "--params", str(params), "--nproc", "2")
    out, _ = proc.communicate(timeout=420)
    assert proc.returncode == 0, out[-4000:]
    report = json.loads((tmp_path / "reports/train.json").read_text())
    assert report["world_size"] == 2
    assert report["steps"] == 6 and report["tokens_seen"] == 6 * 4 * 64  # global batch 4 = 2 ranks x 2
    # Each step trained on the same samples as the single-process run (streaming's elastic determinism).
    single = batch_log(trained_run["dir"])[:6]
    dual = batch_log(tmp_path)
    assert [sorted(x["samples"]) for x in dual] == [sorted(x["samples"]) for x in single]
    # Same model, same data: the losses agree up to the per-rank averaging of FIM padding.
    ref = [float(r["train_loss"]) for r in curve(trained_run["dir"])[:6]]
    got = [float(r["train_loss"]) for r in curve(tmp_path)]
    assert got == pytest.approx(ref, rel=2e-2)


def test_wandb_offline_run_directory(tmp_path, shards_dir, tiny_model_dir, monkeypatch):
    from pipeline.train.trainer import train

    monkeypatch.setenv("OWNLLM_WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", "")
    data = tiny_params(tmp_path, shards_dir, tiny_model_dir, max_duration="3ba", eval_interval="1000ba")
    train(parse_params(data))
    runs = list((tmp_path / "wandb").rglob("offline-run-*"))
    assert runs and any(p.suffix == ".wandb" for p in runs[0].iterdir())
    # A second invocation finds the run complete through autoresume, without asking W&B for checkpoints.
    train(parse_params(data))
