"""SFT → DPO/KTO with TRL on a tiny real model: it learns the preferences, and is deterministic."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf.tune import PAIRS_FILE, preference_method, read_jsonl, run_preference, run_sft, weights_hash
from rlhf_fixtures import rlhf_params, write_snapshot


def preference_margin(model_dir: Path, pairs: list[dict]) -> float:
    """Mean over pairs of log p(chosen | prompt) - log p(rejected | prompt): what DPO pushes up."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)

    def logp(prompt: str, completion: str) -> float:
        p, c = tok(prompt)["input_ids"], tok(completion)["input_ids"]
        ids = torch.tensor([p + c])
        with torch.no_grad():
            logprobs = model(ids).logits[0, :-1].log_softmax(-1)
        return float(logprobs[len(p) - 1:].gather(1, ids[0, len(p):, None]).sum())

    return sum(logp(r["prompt"], r["chosen"]) - logp(r["prompt"], r["rejected"]) for r in pairs) / len(pairs)


def test_preference_method_falls_back_to_kto_when_pairs_are_scarce(tmp_path, tiny_model_dir):
    p = rlhf_params(tmp_path, tiny_model_dir, min_pairs=5).rlhf
    assert preference_method(p, 4) == "kto"
    assert preference_method(p, 5) == "dpo"
    assert preference_method(p.model_copy(update={"method": "kto"}), 50) == "kto"


@pytest.mark.slow
def test_sft_then_dpo_is_deterministic_and_changes_weights(tmp_path, tiny_model_dir):
    hashes = []
    for run in ("a", "b"):
        params = rlhf_params(tmp_path / run, tiny_model_dir)
        write_snapshot(tmp_path / run / "data/feedback")
        sft = run_sft(params)
        assert sft.method == "sft" and sft.steps == 2 and sft.tokens > 0
        pref = run_preference(params)
        assert pref.method == "dpo" and pref.steps == 2 and pref.tokens > 0
        assert (pref.out_dir / "tokenizer.json").is_file()
        hashes.append((weights_hash(sft.out_dir), weights_hash(pref.out_dir)))
    assert hashes[0] == hashes[1], "same snapshot + same params must give identical weights"
    base = weights_hash(tiny_model_dir)
    assert base != hashes[0][0] != hashes[0][1]
    # DPO learned the preferences: on its training pairs the chosen completion gained on the rejected one,
    # relative to the SFT model it started from (and used as its reference).
    pairs = read_jsonl(Path(params.rlhf.snapshot_dir) / PAIRS_FILE)
    before, after = preference_margin(sft.out_dir, pairs), preference_margin(pref.out_dir, pairs)
    assert after > before, (before, after)


@pytest.mark.slow
def test_kto_when_pairs_below_threshold(tmp_path, tiny_model_dir):
    params = rlhf_params(tmp_path, tiny_model_dir, min_pairs=100)
    write_snapshot(tmp_path / "data/feedback")
    res = run_preference(params, model_dir=tiny_model_dir)
    assert res.method == "kto" and res.steps == 2
    assert weights_hash(res.out_dir) != weights_hash(tiny_model_dir)


def test_empty_sft_set_passes_parent_through(tmp_path, tiny_model_dir):
    params = rlhf_params(tmp_path, tiny_model_dir)
    write_snapshot(tmp_path / "data/feedback", n_sft=0)
    res = run_sft(params)
    assert res.method == "copy"
    assert weights_hash(res.out_dir) == weights_hash(tiny_model_dir)
