"""The project's own BPE tokenizer: special tokens, code-fit pre-tokenisation, training and loading.

`ownllm tokenizer train` writes ``artifacts/tokenizer/`` (``tokenizer.json`` plus the files that
``transformers.AutoTokenizer.from_pretrained`` needs). Everything downstream (shards, training, FIM,
serving) loads it from there; :func:`load_fast` is the cheap path that needs only ``tokenizers``.
"""

from __future__ import annotations

from pathlib import Path

EOS = "<|endoftext|>"
FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX, FIM_PAD = "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>"
PAD = FIM_PAD
# The control tokens every model of this project has (the reserved ones follow them): text that holds one
# cannot be a training document or an evaluation case.
SPECIAL_TOKENS = (EOS, FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX, FIM_PAD)


def special_tokens(n_reserved: int) -> list[str]:
    """All special tokens in id order: EOS first (id 0), the FIM tokens, then the reserved ones.

    Reserved tokens let later features (new control tokens) claim ids without resizing the model.
    """
    return [*SPECIAL_TOKENS] + [f"<|reserved_{i}|>" for i in range(n_reserved)]


def load_fast(tokenizer_dir: str | Path):
    """The raw ``tokenizers.Tokenizer`` (no transformers import): what the shards stage encodes with."""
    from tokenizers import Tokenizer

    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer not found: {path} (run `ownllm tokenizer train` first)")
    return Tokenizer.from_file(str(path))
