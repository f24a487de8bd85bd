"""Tokenizers and random-weight Llamas for the benchmarks, built by the pipeline's own code.

A benchmark that needs a model without running the pipeline (serving, evaluation, tuning, training speed)
fits a byte-level BPE on a few stdlib files with ``pipeline.tokenizer.train`` (the production special-token
layout: EOS, the FIM tokens, the reserved ones) and sizes a Llama with ``pipeline.train.model.build_model``
from a ``ModelConfig``. One place, so the benchmarks measure the models the pipeline builds rather than
look-alikes that drift from them.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def stdlib_texts(names: list[str] | None = None, first: int | None = None) -> list[str]:
    """Real Python code: the named stdlib files, or the first ``first`` top-level modules by name."""
    if names is not None:
        return [(STDLIB / n).read_text(encoding="utf-8", errors="replace") for n in names]
    return [f.read_text(encoding="utf-8", errors="replace") for f in sorted(STDLIB.glob("*.py"))[:first]]


def fit_tokenizer(out: Path, texts: list[str], vocab_size: int, reserved_tokens: int = 16):
    """A BPE tokenizer trained on ``texts`` and saved for ``AutoTokenizer`` in ``out``; returns it loaded.

    The pipeline's trainer and files (``train_bpe``, ``save_for_transformers``), with Hugging Face's plain
    byte-level pre-tokenizer: a benchmark needs a fast, deterministic vocabulary, not the code-fit one."""
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    from pipeline.config import TokenizerConfig
    from pipeline.tokenizer.train import save_for_transformers, train_bpe

    # min_frequency 1: every pair seen can merge (BpeTrainer's own default), as a small corpus needs.
    cfg = TokenizerConfig(out=str(out), vocab_size=vocab_size, min_frequency=1, reserved_tokens=reserved_tokens)
    save_for_transformers(train_bpe(texts, cfg, pre_tokenizers.ByteLevel(add_prefix_space=False)), cfg, Path(out))
    return AutoTokenizer.from_pretrained(str(out))


def llama(tokenizer, model=None, seed: int = 0, **overrides):
    """A Llama sized by ``model`` (a ``ModelConfig``; default: the schema's defaults) with ``overrides``
    (``d_model=128``...) and random weights seeded by ``seed``, in memory."""
    from pipeline.config import ModelConfig
    from pipeline.train.model import build_model

    base = model.model_dump() if model is not None else {}
    return build_model(ModelConfig.model_validate({**base, **overrides}), tokenizer, seed)  # validated shape


def random_llama(out: Path, tokenizer, model=None, seed: int = 0, **overrides) -> Path:
    """``llama`` saved in ``out`` (beside its tokenizer)."""
    llama(tokenizer, model, seed, **overrides).save_pretrained(out)
    return Path(out)


def tiny_model(out: Path, texts: list[str], vocab_size: int, model=None, seed: int = 0, **overrides) -> Path:
    """``fit_tokenizer`` and ``random_llama`` into one directory (what ``AutoModelForCausalLM`` loads)."""
    return random_llama(out, fit_tokenizer(out, texts, vocab_size), model, seed, **overrides)
