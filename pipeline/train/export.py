"""`ownllm export`: the trained model plus its tokenizer as a Hugging Face model directory (models/base/),
and its CTranslate2 conversion beside the weights (models/base/ct2/, what the gateway's engine serves).

The default input is the deterministic final model that `ownllm train` writes (``train.final_model``);
``--checkpoint`` exports any Composer checkpoint instead (e.g. one from before a spike). The export is checked before it is declared done: it must load with
``AutoModelForCausalLM`` and greedily complete both a plain and a FIM prompt, and the CTranslate2 conversion
must complete the plain prompt with the very same tokens.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pipeline.config import Params
from pipeline.fim_prompt import fim_text

SMOKE_PREFIX = "def read_lines(path):\n    with open(path) as f:\n        "
SMOKE_SUFFIX = "\n    return lines\n"
CT2_SUBDIR = "ct2"  # <model dir>/ct2/: the CTranslate2 conversion beside the Hugging Face files


def ct2_dir(model_dir: str | Path) -> Path:
    return Path(model_dir) / CT2_SUBDIR


def has_ct2(model_dir: str | Path) -> bool:
    """Whether a model directory carries the CTranslate2 format (the registry serves whichever it has)."""
    return (ct2_dir(model_dir) / "model.bin").is_file()


def convert_to_ct2(model_dir: str | Path, out: str | Path | None = None) -> Path:
    """Convert a Hugging Face model directory to CTranslate2, in float32 (int8 is applied when loading,
    ``serve.quantization``, so one artefact serves both). Byte-identical output for identical weights."""
    from ctranslate2.converters import TransformersConverter

    out = Path(out) if out else ct2_dir(model_dir)
    TransformersConverter(str(model_dir)).convert(str(out), quantization="float32", force=True)
    cfg_file = out / "config.json"
    cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    if cfg.get("bos_token") is None:  # CT2 refuses a null; our documents start after end-of-text anyway
        cfg["bos_token"] = cfg.get("eos_token")
        cfg_file.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    return out


def export(params: Params, checkpoint: str | None = None) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from pipeline.train.data import load_tokenizer

    out = Path(params.export.out)
    tokenizer = load_tokenizer(params)
    if checkpoint:
        model = model_from_checkpoint(params, checkpoint, tokenizer)
    else:
        src = Path(params.train.final_model)
        if not (src / "config.json").is_file():
            raise FileNotFoundError(f"no trained model at {src}: run `ownllm train` first (or pass --checkpoint)")
        model = AutoModelForCausalLM.from_pretrained(src)
    model = model.to(getattr(torch, params.export.dtype))
    if out.exists():
        shutil.rmtree(out)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id,
                                               bos_token_id=tokenizer.eos_token_id, do_sample=False)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if params.export.ctranslate2:
        convert_to_ct2(out)
    return smoke_test(out)


def model_from_checkpoint(params: Params, checkpoint: str, tokenizer):
    """The HF model inside a Composer checkpoint (weights under ``state.model`` as ``model.<hf name>``).

    Composer's own converter needs the optional ``peft`` package; rebuilding the model from params and
    loading the weights needs nothing else.
    """
    import torch

    from pipeline.train.model import build_model

    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"no Composer checkpoint at {path}")
    state = torch.load(path, map_location="cpu", weights_only=False)["state"]["model"]
    weights = {k.removeprefix("model."): v for k, v in state.items()}
    model = build_model(params.model, tokenizer, params.seed)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not (model.config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match params.model: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    return model


def complete(model, tokenizer, prompt: str, max_new_tokens: int = 24) -> str:
    import torch

    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def smoke_test(model_dir: str | Path) -> dict:
    """Load the export like any consumer would and complete a plain and a FIM prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    out = {"model_dir": str(model_dir), "params": sum(p.numel() for p in model.parameters()),
           "vocab_size": len(tok),
           "sample_completion": complete(model, tok, SMOKE_PREFIX),
           "sample_infill": complete(model, tok, fim_text(SMOKE_PREFIX, SMOKE_SUFFIX))}
    if has_ct2(model_dir):
        got = complete_ct2(model_dir, tok, SMOKE_PREFIX)
        if got != out["sample_completion"]:
            raise ValueError(f"the CTranslate2 conversion in {ct2_dir(model_dir)} completes {SMOKE_PREFIX!r} with "
                             f"{got!r}, transformers with {out['sample_completion']!r}")
        out["ctranslate2"] = str(ct2_dir(model_dir))
    return out


def complete_ct2(model_dir: str | Path, tokenizer, prompt: str, max_new_tokens: int = 24) -> str:
    """Greedy completion by the CTranslate2 conversion (the same stopping rule as :func:`complete`)."""
    import ctranslate2

    gen = ctranslate2.Generator(str(ct2_dir(model_dir)), compute_type="float32", intra_threads=1)
    start = tokenizer.convert_ids_to_tokens(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    res = gen.generate_batch([start], max_length=max_new_tokens, include_prompt_in_result=False,
                             end_token=[tokenizer.eos_token_id])
    return tokenizer.decode(res[0].sequences_ids[0], skip_special_tokens=True)


def main(args) -> int:
    from pipeline.config import load_params
    from pipeline.tracking import say, write_json

    from pipeline import numerics

    params = load_params(args.params)
    numerics.apply(params.numerics)
    try:
        result = export(params, getattr(args, "checkpoint", None))
    except (FileNotFoundError, ValueError) as exc:
        from pipeline.cli import UserError

        raise UserError(str(exc)) from None
    result["numerics"] = numerics.record(params.numerics, "cpu")  # the smoke completions depend on it
    write_json(Path(params.tracking.reports_dir) / "export.json", result)
    say(f"[export] {result['params']:,}-parameter model → {result['model_dir']}; "
        f"completes {SMOKE_PREFIX.splitlines()[-1].strip() or 'with'!r} with {result['sample_completion'][:40]!r}")
    return 0
