"""Loss-spike bisecting: ddmin on its own, and the planted-spike scenario end to end.

The scenario: real stdlib files plus one planted poisoned document (a long run of random characters)
go through the real shards stage; a tiny run with a high learning rate spikes on the step that reads it;
`ownllm bisect` confirms the spike and names the planted document; `--exclude` plus rebuilding shards and
retraining makes the spike go away while every step before the window keeps its loss bit for bit.

Why the steps before the window stay identical: the planted document's id sorts last in canonical
(lang, id) order, so it is packed into the last samples and excluding it changes no earlier sample;
streaming's py1e shuffle draws one random offset per sample in order, so dropping the last samples
keeps the relative order of all others. Steps before the first step that read a planted sample read
exactly the same samples in both runs.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

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

    # `dvc repro` in miniature: shards without the named documents, then the same run again.
    old = train_samples(params)
    shards, _ = run_shards(params)
    assert shards["excluded"]["ids"] == sorted(named)
    new = train_samples(params)
    first = next(i for i, spans in enumerate(old) if any(sp[0] in named for sp in spans[1]))
    assert new[:first] == old[:first]  # packing of everything before the planted document is unchanged
    assert not any(sp[0] in named for _, spans in new for sp in spans)
    train(params)
    after = losses(root / "reports/train")
    assert after[SPIKE_STEP] < report["threshold"]
    assert json.loads((root / "reports/train/spikes.json").read_text()) == []  # the run is calm now
    # Not asserted: identical losses before the window. streaming's py1e shuffle permutes the whole epoch
    # as a function of the sample count, so dropping any sample reorders every step (see docs/BISECT.md).
    assert after[0] != before[0] or len(new) == len(old)


def train_samples(params) -> list[tuple[bytes, list]]:
    """Every train sample of the shards, in index order: (token bytes, doc spans)."""
    from pipeline.train import data as tdata

    ds = tdata.make_dataset(params, "train", 1)
    try:
        return [(ds[i]["tokens"].tobytes(), ds[i]["doc_spans"]) for i in range(ds.size)]
    finally:
        tdata.release(ds)
