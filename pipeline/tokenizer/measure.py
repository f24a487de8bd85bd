"""What reports/tokenizer.json says about a tokenizer: compression, vocabulary use, indentation cost.

All figures are computed on held-out documents (the validation split, never seen in training), for
our tokenizer and for the default-ByteLevel baseline side by side.
"""

from __future__ import annotations

import re
from collections import defaultdict

import numpy as np
from tokenizers import Tokenizer

INDENT = re.compile(r"^[ \t]+", re.MULTILINE)


def bytes_per_token(tok: Tokenizer, texts: list[str], langs: list[str]) -> dict[str, float]:
    """UTF-8 bytes of source per token, per language and overall (higher = better compression)."""
    n_bytes: dict[str, int] = defaultdict(int)
    n_tokens: dict[str, int] = defaultdict(int)
    for text, lang, enc in zip(texts, langs, tok.encode_batch_fast(texts, add_special_tokens=False)):
        for key in (lang, "all"):
            n_bytes[key] += len(text.encode("utf-8"))
            n_tokens[key] += len(enc.ids)
    return {k: round(n_bytes[k] / n_tokens[k], 4) for k in sorted(n_bytes) if n_tokens[k]}


def vocab_coverage(tok: Tokenizer, texts: list[str], n_special: int) -> dict[str, float | int]:
    """How much of the learned vocabulary the held-out code actually uses (specials excluded)."""
    used: set[int] = set()
    for enc in tok.encode_batch_fast(texts, add_special_tokens=False):
        used.update(enc.ids)
    learned = tok.get_vocab_size() - n_special
    used_learned = len({i for i in used if i >= n_special})
    return {"learned_tokens": learned, "used_on_heldout": used_learned, "fraction": round(used_learned / learned, 4)}


def indentation_cost(tok: Tokenizer, texts: list[str]) -> dict[str, float | int]:
    """Tokens spent on the leading whitespace (spaces/tabs) of lines.

    An indentation token is a whitespace-only token that overlaps a line's leading run (a word token
    that carries the run's last space, like `` return``, is not counted: it would exist anyway). A
    tokenizer that spent one token per space or tab would show ``chars_per_token`` near 1; ours should
    need about one token per indented line.
    """
    indent_chars = indent_tokens = indented_lines = 0
    for text, enc in zip(texts, tok.encode_batch(texts, add_special_tokens=False)):
        runs = [m.span() for m in INDENT.finditer(text)]
        if not runs or not enc.offsets:
            continue
        mask = np.zeros(len(text) + 1, dtype=np.int64)
        for start, end in runs:
            mask[start + 1 : end + 1] = 1
            indent_chars += end - start
        indented_lines += len(runs)
        covered = np.cumsum(mask)  # covered[i] = indentation chars in text[:i]
        offs = np.asarray(enc.offsets, dtype=np.int64).clip(0, len(text))
        hits = np.flatnonzero(covered[offs[:, 1]] > covered[offs[:, 0]])
        indent_tokens += sum(text[offs[i, 0]:offs[i, 1]].isspace() for i in hits)
    return {
        "indent_chars": indent_chars,
        "indented_lines": indented_lines,
        "indent_tokens": indent_tokens,
        "chars_per_token": round(indent_chars / indent_tokens, 4) if indent_tokens else 0.0,
        "tokens_per_indented_line": round(indent_tokens / indented_lines, 4) if indented_lines else 0.0,
    }


def indentation_probe(tok: Tokenizer) -> dict[str, int]:
    """Tokens used by one indentation run of each width, inside a line of Python."""
    out = {}
    for name, ws in (("4_spaces", " " * 4), ("8_spaces", " " * 8), ("16_spaces", " " * 16), ("32_spaces", " " * 32),
                     ("1_tab", "\t"), ("2_tabs", "\t" * 2), ("4_tabs", "\t" * 4)):
        out[name] = indentation_cost(tok, [f"if x:\n{ws}return y\n"])["indent_tokens"]
    return out


def lossless_failures(tok: Tokenizer, texts: list[str]) -> int:
    """Documents that do not survive encode → decode unchanged (must be 0 for byte-level BPE)."""
    encs = tok.encode_batch_fast(texts, add_special_tokens=False)
    decoded = tok.decode_batch([e.ids for e in encs], skip_special_tokens=False)
    return sum(d != t for d, t in zip(decoded, texts))
