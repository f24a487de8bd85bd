"""Loss-spike bisecting: ddmin on its own, and the planted-spike scenario end to end.

The scenario: real stdlib files plus one planted poisoned document (a long run of random characters)
go through the real shards stage; a tiny run with a high learning rate spikes on the step that reads it;
`ownllm bisect` confirms the spike and names the planted document; `--exclude` plus rebuilding shards and
retraining makes the spike go away while every step before the window keeps its loss bit for bit.

Why the steps before the window stay identical: ``shards.exclude_mode: mask`` (the default) keeps the
excluded document's positions as ``<fim_pad>`` (no loss) and removes only its spans, so the sample count,
every other sample's bytes and the shard layout are unchanged, and so is streaming's shuffle order. Every
step before the first one that reads a planted sample reads exactly the same samples in both runs.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import numpy as np
import pytest
from train_helpers import STDLIB, tiny_params, write_params

from pipeline.bisect.ddmin import ddmin

CORPUS = ["colorsys.py", "keyword.py", "bisect.py", "fnmatch.py", "numbers.py", "heapq.py", "textwrap.py",
          "string.py", "copy.py", "reprlib.py", "queue.py", "glob.py", "sched.py", "graphlib.py", "tokenize.py"]
# shlex.py is left out on purpose: its Latin-1 `wordchars` line is a natural spike of its own (bisect finds it).
SHUFFLE_SEED = 9  # with this corpus, the first whole planted sample is read at step 71 of 674 per epoch
SPIKE_STEP = 71
SEQ = 64


# -------------------------------------------------------------------------------------- ddmin, fast
def test_ddmin_finds_a_single_culprit_in_log_steps():
    cands = [f"d{i:02d}" for i in range(32)]
    calls = []

    def fails(kept):
        calls.append(kept)
        return "d21" in kept

    res = ddmin(cands, fails, max_tests=64)
    assert res.candidates == ["d21"] and res.stopped == "min_candidates"
    assert res.tests <= 2 * 5  # about two tests per halving, far below one per document
    assert ddmin(cands, fails, max_tests=64).history == res.history  # deterministic


def test_ddmin_keeps_an_interacting_pair_and_respects_the_budget():
    cands = [f"d{i}" for i in range(16)]

    def fails(kept):
        return "d3" in kept and "d12" in kept  # neither half alone spikes

    res = ddmin(cands, fails, max_tests=200)
    assert sorted(res.candidates) == ["d12", "d3"] and res.stopped == "minimal"
    short = ddmin(cands, fails, max_tests=3)
    assert short.tests == 3 and short.stopped == "max_tests" and {"d3", "d12"} <= set(short.candidates)
    assert ddmin(cands, fails, min_candidates=4, max_tests=200).stopped == "min_candidates"


def test_append_exclusions_is_idempotent(tmp_path):
    from pipeline.bisect.cli import append_exclusions
    from pipeline.data.shards import read_exclude_ids

    path = tmp_path / "exclude_ids.txt"
    path.write_text("# header\nabc\n", encoding="utf-8")
    assert append_exclusions(path, ["abc", "def"], "bisect: spike at step 7") == ["def"]
    assert append_exclusions(path, ["def", "abc"], "bisect: spike at step 7") == []
    assert read_exclude_ids(path) == ["abc", "def"]
    assert path.read_text().count("spike at step 7") == 1


def test_bisect_without_a_spike_is_a_clear_user_error(tmp_path, capsys):
    from pipeline.cli import main

    params = write_params(tmp_path / "params.yaml", tiny_params(tmp_path, tmp_path / "shards", tmp_path / "tok"))
    (tmp_path / "reports/train").mkdir(parents=True)
    (tmp_path / "reports/train/spikes.json").write_text("[]\n")
    assert main(["bisect", "--params", str(params)]) == 2
    assert "no spike recorded in" in capsys.readouterr().err
    assert main(["bisect", "--params", str(params), "--step", "5"]) == 2  # and no loss curve to judge it by
    assert "no loss curve" in capsys.readouterr().err


def test_a_batch_with_no_label_left_trains_nothing(tiny_model_dir):
    """Masked excluded documents can fill whole samples: no NaN loss, and no update from them."""
    import torch
    from transformers import AutoTokenizer

    from pipeline.config import ModelConfig
    from pipeline.train.model import build_model, composer_model

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = composer_model(build_model(ModelConfig(n_layers=1, d_model=32, n_heads=2, n_kv_heads=2, max_seq_len=16),
                                       tok, 0), tok)
    pad = tok.convert_tokens_to_ids("<fim_pad>")
    batch = {"input_ids": torch.full((2, 16), pad), "labels": torch.full((2, 16), -100)}
    loss = model.loss(model(batch), batch)
    loss.backward()
    assert float(loss) == 0.0 and all(not p.grad.any() for p in model.parameters() if p.grad is not None)
    batch["input_ids"][1, :8] = torch.arange(10, 18)
    batch["labels"][1, :8] = torch.arange(10, 18)
    assert torch.isfinite(model.loss(model(batch), batch)) and float(model.loss(model(batch), batch)) > 0


# ------------------------------------------------------------------------------- the planted spike
def poison_content(nonce: int) -> str:
    """60 random CJK characters: byte tokens that never occur in the stdlib code, so every one is a surprise."""
    rng = random.Random(99)
    return f"# {nonce}\n" + "".join(chr(rng.randrange(0x4E00, 0x9FFF)) for _ in range(60)) + "\n"


def planted_doc(others: list[str], val_frac: float) -> dict:
    """The poisoned document, with a nonce chosen so its id sorts after every other id and it trains."""
    from pipeline.data.records import make_doc, split_of

    for nonce in range(100_000):
        doc = make_doc("planted", "poison.py", "python", poison_content(nonce))
        if doc["id"] > max(others) and split_of(doc["id"], val_frac) == "train":
            return doc
    raise AssertionError("no nonce gives the planted document the last id")


def scenario_params(root: Path, tokenizer: Path):
    from pipeline.config import parse_params

    data = tiny_params(root, root / "shards", tokenizer, global_batch_size=1, device_microbatch_size=1, lr=3e-3,
                       warmup="4ba", max_duration=f"{SPIKE_STEP + 4}ba", save_interval="40ba", eval_interval="1000ba",
                       save_num_checkpoints_to_keep=-1, shuffle_seed=SHUFFLE_SEED,
                       spike={"k": 1.3, "window": 8, "patience": 1})
    data["model"].update(d_model=64)
    data["data"]["dedup"] = {"out": str(root / "dedup")}
    data["shards"].update(val_frac=0.2, exclude_ids=str(root / "exclude_ids.txt"), encode_batch_docs=8)
    data["decontam"] = {"enabled": False, "rejected": str(root / "rejected/decontam")}
    data["bisect"] = {"out": str(root / "reports/bisect"), "max_replays": 16, "min_candidates": 1}
    write_params(root / "params.yaml", data)
    return parse_params(data, str(root / "params.yaml"))


def losses(reports_dir: Path) -> list[float]:
    with (reports_dir / "loss.csv").open(newline="") as f:
        return [float(r["train_loss"]) for r in csv.DictReader(f)]


def skipped(reports_dir: Path) -> list[bool]:
    with (reports_dir / "loss.csv").open(newline="") as f:
        return [r["skipped"] == "1" for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory, tiny_model_dir):
    """Real stdlib documents + the planted one → real shards stage → a tiny high-LR run that spikes."""
    from pipeline.data.records import DOC_SCHEMA, make_doc, to_table, write_docs
    from pipeline.data.shards import run_shards
    from pipeline.train.trainer import train

    root = tmp_path_factory.mktemp("bisect")
    docs = [make_doc("stdlib", n, "python", (STDLIB / n).read_text(encoding="utf-8")) for n in CORPUS]
    poison = planted_doc([d["id"] for d in docs], 0.2)
    write_docs(to_table(docs + [poison], DOC_SCHEMA), root / "dedup")
    (root / "exclude_ids.txt").write_text("# document ids dropped from the shards\n", encoding="utf-8")
    params = scenario_params(root, tiny_model_dir)
    run_shards(params)
    train(params)
    return {"root": root, "params": params, "poison": poison["id"]}


@pytest.mark.slow
def test_planted_spike_is_found_excluded_and_gone(planted_run, capsys):
    from pipeline.cli import main
    from pipeline.data.shards import read_exclude_ids, run_shards
    from pipeline.tokenizer import FIM_PAD, load_fast
    from pipeline.train.trainer import train

    root, params, poison = planted_run["root"], planted_run["params"], planted_run["poison"]
    spikes = json.loads((root / "reports/train/spikes.json").read_text())
    assert [s["step"] for s in spikes] == [SPIKE_STEP] and poison in spikes[0]["doc_ids"]
    before = losses(root / "reports/train")

    assert main(["bisect", "--params", str(root / "params.yaml"), "--exclude"]) == 0
    report = json.loads((root / f"reports/bisect/base-{SPIKE_STEP}.json").read_text())
    assert report["reproduces"] and report["bit_identical"]  # the replay is the run, bit for bit
    assert report["window"]["start"] == 40 and report["checkpoint"].endswith("ep0-ba40-rank0.pt")
    named = [d["id"] for d in report["documents"]]
    assert poison in named and len(named) <= 3
    planted = next(d for d in report["documents"] if d["id"] == poison)
    assert planted["source"] == "planted" and planted["path"] == "poison.py" and planted["steps"] == [SPIKE_STEP]
    assert any("loss" in why for why in planted["why"])
    ev = report["evidence"]
    assert ev["with_all"] == spikes[0]["loss"]
    # One sample per step here: without the named documents the spike step holds nothing left to measure.
    assert ev["without_named"] is None or ev["without_named"] < report["threshold"]
    assert report["search"]["replays"] < report["search"]["naive_replays"]
    assert [s["loss"] for s in report["spike_step_samples"]] and report["compare_against"]["git_revision"]
    assert "Documents behind the spike" in capsys.readouterr().err  # the readable table
    assert read_exclude_ids(params.shards.exclude_ids) == named
    assert f"step {SPIKE_STEP}" in Path(params.shards.exclude_ids).read_text()

    window = range(report["window"]["start"], SPIKE_STEP + 1)
    assert [ev["losses_with_all"][str(s)] for s in window] == [before[s] for s in window]  # replay == run

    # `dvc repro` in miniature: shards without the named documents (masked), then the same run again.
    old = train_samples(params)
    old_batches = [json.loads(ln) for ln in (root / "reports/train/batches.jsonl").read_text().splitlines()]
    shards, _ = run_shards(params)
    assert shards["excluded"]["ids"] == sorted(named) and shards["excluded"]["mode"] == "mask"
    new = train_samples(params)
    assert len(new) == len(old)  # same sample count, so streaming's shuffle order is the same
    touched = {i for i, (_, spans) in enumerate(old) if any(sp[0] in named for sp in spans)}
    assert touched and not any(sp[0] in named for _, spans in new for sp in spans)
    untouched = [i for i in range(len(old)) if i not in touched]
    assert [new[i] for i in untouched] == [old[i] for i in untouched]  # byte-identical, same spans
    assert shards["excluded"]["masked_tokens"] >= sum(sp[3] for i in touched for sp in old[i][1] if sp[0] in named)
    pad = load_fast(params.tokenizer.out).token_to_id(FIM_PAD)
    for i in touched:  # the named documents' positions now hold <fim_pad> (label -100)
        tokens = np.frombuffer(new[i][0], np.int32)
        assert all((tokens[sp[2]:sp[2] + sp[3]] == pad).all() for sp in old[i][1] if sp[0] in named)
    train(params)
    after = losses(root / "reports/train")
    # Every step before the first one that reads a masked sample is the same step, loss for loss.
    first = min(b["step"] for b in old_batches if touched & set(b["samples"]))
    assert report["window"]["start"] <= first <= SPIKE_STEP
    assert after[:first] == before[:first]  # exact float equality (loss.csv holds repr()s)
    assert len(after) == len(before) and after != before
    # The spike is gone: its step now has nothing left to learn from (skipped) or a calm loss.
    assert skipped(root / "reports/train")[SPIKE_STEP] or after[SPIKE_STEP] < report["threshold"]
    assert json.loads((root / "reports/train/spikes.json").read_text()) == []  # the run is calm now


def train_samples(params) -> list[tuple[bytes, list]]:
    """Every train sample of the shards, in index order: (token bytes, doc spans)."""
    from pipeline.train import data as tdata

    ds = tdata.make_dataset(params, "train", 1)
    try:
        return [(ds[i]["tokens"].tobytes(), ds[i]["doc_spans"]) for i in range(ds.size)]
    finally:
        tdata.release(ds)
