"""`ownllm export`: models/base/ in Hugging Face format that loads with Auto classes and generates, FIM included."""

from __future__ import annotations

import json

import pytest
from train_helpers import write_params

pytestmark = pytest.mark.slow


def test_export_loads_and_generates_plain_and_fim(trained_run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.cli import main
    from pipeline.fim_prompt import fim_text as fim_prompt

    d = trained_run["dir"]
    params_file = write_params(d / "params.yaml", trained_run["data"])
    assert main(["export", "--params", str(params_file)]) == 0

    out = d / "models/base"
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.vocab_size == len(tok)
    assert model.config.pad_token_id == tok.convert_tokens_to_ids("<fim_pad>")
    assert tok.eos_token == "<|endoftext|>"
    # The exported weights are the trained ones, bit for bit.
    trained = AutoModelForCausalLM.from_pretrained(d / "artifacts/train/final")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), trained.state_dict().values()))

    prompt = fim_prompt("def square(x):\n    ", "\n\nprint(square(3))\n")
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    assert ids["input_ids"][0, 0].item() == tok.convert_tokens_to_ids("<fim_prefix>")  # sentinels are single tokens
    gen = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert gen.shape[1] > ids["input_ids"].shape[1]
    assert isinstance(tok.decode(gen[0, ids["input_ids"].shape[1]:]), str)

    report = json.loads((d / "reports/export.json").read_text())
    assert report["params"] == trained_run["summary"]["params"]
    # The CTranslate2 conversion sits beside the weights, and the smoke test found it completes alike.
    assert (out / "ct2" / "model.bin").is_file() and report["ctranslate2"] == str(out / "ct2")
    assert isinstance(report["sample_infill"], str) and isinstance(report["sample_completion"], str)


def test_export_from_a_composer_checkpoint(trained_run, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.config import parse_params
    from pipeline.train.export import export
    from pipeline.train.trainer import checkpoint_dir

    params = trained_run["params"]
    ckpt = checkpoint_dir(params) / "ep0-ba8-rank0.pt"
    assert ckpt.is_file()
    data = {**trained_run["data"], "export": {"out": str(tmp_path / "ba8")}}
    export(parse_params(data), checkpoint=str(ckpt))
    m8 = AutoModelForCausalLM.from_pretrained(tmp_path / "ba8")
    final = AutoModelForCausalLM.from_pretrained(trained_run["dir"] / "artifacts/train/final")
    assert not all(torch.equal(a, b) for a, b in zip(m8.state_dict().values(), final.state_dict().values()))


def test_export_without_a_trained_model_is_a_clear_error(trained_run, tmp_path, capsys):
    from pipeline.cli import main

    data = {**trained_run["data"], "train": {**trained_run["data"]["train"], "final_model": str(tmp_path / "none")}}
    assert main(["export", "--params", str(write_params(tmp_path / "p.yaml", data))]) == 2
    assert "run `ownllm train` first" in capsys.readouterr().err
