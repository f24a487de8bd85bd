def test_tiny_model_loads_and_generates(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = tok("def ", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids["input_ids"].shape[1]
    assert tok.convert_tokens_to_ids("<fim_middle>") != tok.unk_token_id


def test_tiny_model_has_the_production_token_layout(tiny_model_dir):
    """Built by benchmarks/tiny_models.py with the pipeline's trainer: EOS, the FIM tokens, 16 reserved, in id
    order, and the model's config names the same end and pad ids (what the gateway and evaluation stop on)."""
    import json

    from transformers import AutoTokenizer

    from pipeline.tokenizer import PAD, special_tokens

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tok.convert_tokens_to_ids(special_tokens(16)) == list(range(21))
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    assert (cfg["eos_token_id"], cfg["pad_token_id"]) == (0, tok.convert_tokens_to_ids(PAD))
