"""Fill-in-the-middle (Bavarian et al. 2022), applied per document inside a packed sample.

A document slice is decoded to text, cut at two uniformly random *character* positions into
prefix / middle / suffix, each part is re-tokenised, and the parts are re-ordered with sentinel tokens:

    PSM:  <fim_prefix> prefix <fim_suffix> suffix <fim_middle> middle
    SPM:  <fim_prefix> <fim_suffix> suffix <fim_middle> prefix middle      (BigCode Megatron's SPM)

The result keeps the slice's token length, so a sample stays ``max_seq_len`` long: re-tokenising the
parts usually costs a few tokens (three sentinels, merges broken at the cuts), which are taken from the
end of the suffix, as BigCode Megatron's ``permute`` does, and then from the start of the prefix (cut at
a character boundary); a shorter result is padded with ``<fim_pad>`` (labels -100). Only when the middle
alone does not fit does the slice stay next-token (BigCode skips it whenever the suffix is too short).

Written by hand because no library applies FIM to MDS samples: llm-foundry has no FIM, and BigCode's
implementation lives inside Megatron's GPT dataset.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.tokenizer import FIM_MIDDLE, FIM_PAD, FIM_PREFIX, FIM_SUFFIX

IGNORE_INDEX = -100  # labels the loss skips (Hugging Face convention)


def has_targets(labels) -> bool:
    """Whether a (batch, seq) label tensor leaves anything to predict: position 0 never is (the model
    shifts labels by one), and ``IGNORE_INDEX`` positions (FIM padding, masked documents) are skipped."""
    return bool((labels[:, 1:] != IGNORE_INDEX).any())


@dataclass(frozen=True)
class FimTokens:
    prefix: int
    middle: int
    suffix: int
    pad: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "FimTokens":
        ids = {}
        for name in (FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX, FIM_PAD):
            tid = tokenizer.convert_tokens_to_ids(name)
            if tid is None or tid == tokenizer.unk_token_id:
                raise ValueError(f"tokenizer has no special token {name}: FIM needs {FIM_PREFIX}, {FIM_MIDDLE}, "
                                 f"{FIM_SUFFIX} and {FIM_PAD}")
            ids[name] = tid
        return cls(ids[FIM_PREFIX], ids[FIM_MIDDLE], ids[FIM_SUFFIX], ids[FIM_PAD])


@dataclass(frozen=True)
class FimResult:
    tokens: np.ndarray  # same length as the input slice
    spm: bool
    cut: tuple[int, int]  # character offsets of the middle in the decoded text
    truncated: int  # tokens over budget before cutting the suffix end / prefix start


class Codec:
    """Lossless text <-> ids with the fast tokenizer's backend (no clean-up of spaces, no special tokens added)."""

    def __init__(self, tokenizer):
        self.backend = tokenizer.backend_tokenizer

    def decode(self, ids) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]


def permute(text: str, codec: Codec, fim: FimTokens, n_tokens: int, rng: np.random.Generator,
            spm_rate: float) -> FimResult | None:
    """FIM-transform one document slice's text into exactly ``n_tokens`` tokens, or None when it cannot fit."""
    lo, hi = sorted(int(x) for x in rng.integers(0, len(text) + 1, size=2))
    spm = bool(rng.random() < spm_rate)
    p_text, m_text, s_text = text[:lo], text[lo:hi], text[hi:]
    prefix, middle, suffix = codec.encode([p_text, m_text, s_text])
    if 3 + len(middle) > n_tokens:  # the middle is what the model learns to write: never cut it
        return None
    # Too long: cut the end of the suffix first (as BigCode Megatron does), then the start of the prefix,
    # i.e. keep the context nearest to the middle.
    truncated = max(0, 3 + len(prefix) + len(middle) + len(suffix) - n_tokens)
    if truncated:
        s_room = max(0, n_tokens - 3 - len(prefix) - len(middle))
        if len(suffix) > s_room:
            suffix = _fit_text(s_text, suffix, s_room, codec, keep_start=True)
        p_room = n_tokens - 3 - len(suffix) - len(middle)
        if len(prefix) > p_room:
            prefix = _fit_text(p_text, prefix, p_room, codec, keep_start=False)
    if spm:
        out = [fim.prefix, fim.suffix, *suffix, fim.middle, *prefix, *middle]
    else:
        out = [fim.prefix, *prefix, fim.suffix, *suffix, fim.middle, *middle]
    out += [fim.pad] * (n_tokens - len(out))
    return FimResult(np.asarray(out, dtype=np.int64), spm, (lo, hi), truncated)


def _fit_text(text: str, ids: list[int], room: int, codec: Codec, keep_start: bool) -> list[int]:
    """Tokens of the longest *character* prefix (keep_start) or suffix of ``text`` that fit in ``room`` tokens.

    Cutting the token list itself could split a multi-byte character (byte-level BPE) and put a
    replacement character into the training data; cutting the text keeps every part valid text.
    """
    if room <= 0:
        return []
    kept = codec.decode(ids[:room] if keep_start else ids[-room:])
    a, b = (kept, text) if keep_start else (kept[::-1], text[::-1])
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    while n > 0:
        out = codec.encode([text[:n] if keep_start else text[len(text) - n:]])[0]
        if len(out) <= room:
            return out
        n -= 1
    return []


def parse_fim(tokens, fim: FimTokens) -> tuple[list[int], list[int], list[int], bool]:
    """Inverse layout: (prefix, middle, suffix, spm) token lists of a FIM slice, pads stripped. For tests/debugging."""
    toks = [int(t) for t in tokens if int(t) != fim.pad]
    if toks[0] != fim.prefix:
        raise ValueError("not a FIM slice: does not start with <fim_prefix>")
    m = toks.index(fim.middle)
    if toks[1] == fim.suffix:  # SPM
        return [], toks[m + 1:], toks[2:m], True  # prefix and middle are contiguous after <fim_middle>
    s = toks.index(fim.suffix)
    return toks[1:s], toks[m + 1:], toks[s + 1:m], False
