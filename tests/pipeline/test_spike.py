"""Loss-spike detector: on synthetic loss series, and on a real run with a planted garbage document."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from train_helpers import TRAIN_FILES, doc_id, read, tiny_params, write_shards

from pipeline.config import SpikeConfig, parse_params
from pipeline.train.spike import SpikeTracker, detect_spikes


def noisy_decay(n: int, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    return [float(3 + 4 * math.exp(-i / 30) + rng.normal(0, 0.05)) for i in range(n)]


def test_calm_training_has_no_spikes():
    assert detect_spikes(noisy_decay(300), SpikeConfig(k=1.5, window=20, patience=1)) == []


def test_single_spike_is_found_with_its_ratio():
    losses = noisy_decay(200)
    losses[120] = 9.0
    spikes = detect_spikes(losses, SpikeConfig(k=1.5, window=20, patience=1))
    assert [s["step"] for s in spikes] == [120]
    assert spikes[0]["loss"] == 9.0 and spikes[0]["ratio"] == pytest.approx(9.0 / spikes[0]["running_mean"])


def test_nothing_is_flagged_before_the_window_is_full():
    losses = [1.0] * 5 + [50.0] + [1.0] * 30
    assert detect_spikes(losses, SpikeConfig(k=1.5, window=10, patience=1)) == []
    assert [s["step"] for s in detect_spikes(losses, SpikeConfig(k=1.5, window=5, patience=1))] == [5]


def test_patience_needs_consecutive_outliers_and_reports_the_whole_run():
    losses = noisy_decay(200)
    losses[100] = 9.0  # a lone outlier: below patience
    losses[150:154] = [9.0, 9.5, 10.0, 9.0]  # four in a row
    spikes = detect_spikes(losses, SpikeConfig(k=1.5, window=20, patience=2))
    assert [s["step"] for s in spikes] == [150, 151, 152, 153]


def test_nan_and_inf_count_as_spikes():
    losses = noisy_decay(60)
    losses[40], losses[50] = float("nan"), float("inf")
    steps = [s["step"] for s in detect_spikes(losses, SpikeConfig(k=2.0, window=5, patience=1))]
    assert steps == [40, 50]


def test_tracker_state_round_trips_for_resume():
    cfg = SpikeConfig(k=1.5, window=10, patience=2)
    losses = noisy_decay(80)
    losses[60:62] = [9.0, 9.0]
    whole = detect_spikes(losses, cfg)
    a = SpikeTracker.from_config(cfg)
    got = [r for i, x in enumerate(losses[:61]) for r in a.update(i, x)]
    b = SpikeTracker.from_config(cfg)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))  # through a checkpoint's serialisation
    got += [r for i, x in enumerate(losses[61:], start=61) for r in b.update(i, x)]
    assert got == whole and [s["step"] for s in got] == [60, 61]


def garbage_tokens(vocab: int, n: int = 3200, seed: int = 99) -> list[int]:
    """A document of uniformly random token ids: unlearnable (entropy log V), unlike any code."""
    return np.random.default_rng(seed).integers(5, vocab, size=n).tolist()


@pytest.mark.slow
def test_planted_garbage_document_and_high_lr_cause_a_named_spike(tmp_path, tiny_model_dir):
    from pipeline.train.trainer import train

    from transformers import AutoTokenizer

    texts = read(TRAIN_FILES)
    garbage = garbage_tokens(len(AutoTokenizer.from_pretrained(tiny_model_dir)))
    texts["garbage"] = garbage
    write_shards(tmp_path / "shards/train", texts, tiny_model_dir)
    write_shards(tmp_path / "shards/val", read(["this.py", "abc.py"]), tiny_model_dir)
    data = tiny_params(tmp_path, tmp_path / "shards", tiny_model_dir, max_duration="150ba", lr=0.01, warmup="5ba",
                       global_batch_size=1, device_microbatch_size=1, eval_interval="1000ba", save_interval="1000ba",
                       fim_rate=0.0, spike={"k": 1.3, "window": 10, "patience": 1})
    data["model"] = {**data["model"], "d_model": 64, "n_heads": 4, "n_kv_heads": 4}
    params = parse_params(data)
    train(params)

    spikes = json.loads((tmp_path / "reports/train/spikes.json").read_text())
    log = [json.loads(ln) for ln in (tmp_path / "reports/train/batches.jsonl").read_text().splitlines()]
    bad = doc_id(repr(garbage))
    garbage_steps = {x["step"] for x in log if any(bad in ds for ds in x["doc_ids"])}
    assert spikes, "no spike detected"
    assert spikes[0]["step"] in garbage_steps  # the first spike is a garbage batch ...
    assert bad in spikes[0]["doc_ids"]  # ... and the report names the document
    flagged = {s["step"] for s in spikes}
    assert len(flagged & garbage_steps) >= len(flagged) / 2
    report = json.loads((tmp_path / "reports/train.json").read_text())
    assert report["spikes"] == len(spikes)
