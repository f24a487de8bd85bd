"""Convert an ownllm Hugging Face export (Llama + the project's byte-level BPE tokenizer) to GGUF for llama.cpp.

    python scripts/hf_to_gguf.py MODEL_DIR OUT.gguf [--llama-cpp DIR] [--outtype f32|f16|q8_0]

It runs llama.cpp's own converter, ``convert_hf_to_gguf.py`` with its ``gguf-py``, from the llama.cpp tree
that ``scripts/build_llama_server.sh`` unpacks from the llama-cpp-python sdist (default: that script's cache).
One gap is filled here: the converter names a BPE pre-tokenizer by hashing how the tokenizer splits a fixed
text and knows only the hashes of published models, so it refuses ours ("BPE pre-tokenizer was not
recognized"). Our pre-tokenizer is GPT-2's exactly — ByteLevel with GPT-2's regex, no prefix space, no
normalizer — which is checked here from tokenizer.json, so the converter is told ``gpt-2``, the pre-type
llama.cpp implements with that same regex (src/llama-vocab.cpp). Any other tokenizer is refused.
Nothing else of the converter is changed; tests/feedback/test_upstream_llama_cpp.py checks that llama.cpp
tokenises our prompts to the same ids as the Hugging Face tokenizer.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

LLAMA_CPP_VERSION = "0.3.16"  # llama-cpp-python sdist; keep equal to scripts/build_llama_server.sh
DEFAULT_TREE = (Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                / "ownllm" / f"llama-server-{LLAMA_CPP_VERSION}")


class UnsupportedTokenizer(ValueError):
    """The tokenizer's pre-tokenizer is not one llama.cpp implements under a name we can give it."""


def gpt2_pretokenizer(model_dir: Path) -> str:
    """``gpt-2`` if ``model_dir``'s tokenizer splits text exactly as GPT-2 does; raises otherwise."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise UnsupportedTokenizer(f"{path} missing: only a Hugging Face fast tokenizer can be checked")
    tok = json.loads(path.read_text(encoding="utf-8"))
    pre, model = tok.get("pre_tokenizer") or {}, tok.get("model") or {}
    want = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    got = {k: pre.get(k) for k in want}
    if model.get("type") != "BPE" or tok.get("normalizer") is not None or got != want:
        raise UnsupportedTokenizer(
            f"{path}: model {model.get('type')!r}, normalizer {tok.get('normalizer')!r}, pre_tokenizer {got}; "
            f"only a BPE with no normalizer and pre_tokenizer {want} (GPT-2's) is known to match llama.cpp")
    return "gpt-2"


def load_converter(tree: Path):
    script = Path(tree) / "src" / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise FileNotFoundError(f"{script} missing: run scripts/build_llama_server.sh first")
    # The converter's Python dependencies (mistral-common & co., imported at its top) live beside it, not in
    # the project's environment: they are needed for this conversion only.
    sys.path[:0] = [str(Path(tree) / "pylib"), str(script.parent / "gguf-py")]
    spec = importlib.util.spec_from_file_location("convert_hf_to_gguf", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules["convert_hf_to_gguf"] = module
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--llama-cpp", type=Path, default=DEFAULT_TREE,
                    help="the tree scripts/build_llama_server.sh made (default: %(default)s)")
    ap.add_argument("--outtype", default="f32", choices=["f32", "f16", "bf16", "q8_0"])
    args = ap.parse_args(argv)
    pre = gpt2_pretokenizer(args.model_dir)
    conv = load_converter(args.llama_cpp)
    conv.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
    sys.argv = ["convert_hf_to_gguf.py", str(args.model_dir), "--outfile", str(args.out), "--outtype", args.outtype]
    conv.main()


if __name__ == "__main__":
    main()
