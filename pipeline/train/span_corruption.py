"""UL2-style span corruption, the third pretraining objective, for a decoder-only model.

The "other approach" of Replit's code model write-up: besides next-token prediction and FIM, train the
model to restore masked spans, as T5 and UL2's denoisers do (Raffel et al. 2020, Tay et al. 2022). Applied
per document inside a packed sample, like FIM, with probability ``train.span_corruption_rate``. A document
slice of ``n`` tokens becomes exactly ``n`` tokens:

    keep_0 <S_0> keep_1 <S_1> ... keep_{k-1} <S_{k-1}> <SEP> <S_0> span_0 <S_1> span_1 ... <S_{k-1}> span_{k-1}

i.e. the corrupted input (each masked span replaced by its sentinel), a separator, then the targets (each
sentinel followed by the tokens it hides), trained with the ordinary causal loss. Spans are placed as T5's
``random_spans_noise_mask`` places them: ``k = round(n * noise_density / mean_span)`` spans (at most one
per sentinel), ``round(m * noise_density)`` masked tokens in all, span and gap lengths a uniformly random
composition, the slice starting with kept text. ``m = n - 2k - 1`` original tokens fit (the sentinels
appear twice, plus the separator), so the slice's last ``2k + 1`` tokens are not seen — as FIM trims
the end of its suffix. Spans are whole tokens, so nothing is re-tokenised and no character is split.

The defaults (mean span 3, density 0.15) are UL2's R-denoiser / T5's objective; a longer mean span with a
higher density gives UL2's X-denoiser, limited here by the number of sentinels.

Tokens: the tokenizer's reserved tokens (``tokenizer.reserved_tokens``, ids fixed when it is trained):
``<|reserved_0|>`` is the separator, ``<|reserved_1|>`` .. ``<|reserved_{r-1}|>`` the sentinels, so a
tokenizer with 16 reserved tokens allows 15 spans per document slice.

Written by hand because no library applies span corruption to packed MDS samples for a causal LM:
T5's implementation works on TF datasets for encoder-decoder models, and llm-foundry has none.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RESERVED = "<|reserved_{}|>"


@dataclass(frozen=True)
class SpanTokens:
    sep: int
    sentinels: tuple[int, ...]

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "SpanTokens":
        ids = []
        i = 0
        while True:
            name = RESERVED.format(i)
            tid = tokenizer.convert_tokens_to_ids(name)
            if tid is None or tid == tokenizer.unk_token_id or tokenizer.convert_ids_to_tokens(tid) != name:
                break
            ids.append(int(tid))
            i += 1
        if len(ids) < 2:
            raise ValueError(f"span corruption needs at least 2 reserved tokens ({RESERVED.format(0)} as the "
                             f"separator and one sentinel); the tokenizer has {len(ids)}: retrain it with "
                             "tokenizer.reserved_tokens >= 2, or set train.span_corruption_rate to 0")
        return cls(ids[0], tuple(ids[1:]))


@dataclass(frozen=True)
class SpanResult:
    tokens: np.ndarray  # same length as the input slice
    spans: tuple[tuple[int, int], ...]  # [start, end) token offsets of the masked spans in the slice
    kept: int  # original tokens the result covers (the slice's first ``kept``)


def _segments(total: int, parts: int, rng: np.random.Generator) -> list[int]:
    """A uniformly random composition of ``total`` into ``parts`` positive integers (T5's _random_segmentation)."""
    cuts = np.sort(rng.choice(np.arange(1, total), size=parts - 1, replace=False)) if parts > 1 else []
    return np.diff(np.concatenate([[0], cuts, [total]])).astype(int).tolist()


def corrupt(tokens, sp: SpanTokens, rng: np.random.Generator, noise_density: float = 0.15,
            mean_span: float = 3.0) -> SpanResult | None:
    """Span-corrupt one document slice into exactly ``len(tokens)`` tokens, or None when it is too short."""
    tokens = np.asarray(tokens, dtype=np.int64)
    n = len(tokens)
    k = max(1, min(len(sp.sentinels), round(n * noise_density / mean_span)))
    m = n - 2 * k - 1
    n_noise = max(k, round(m * noise_density))
    n_keep = m - n_noise
    if n_keep < k:  # every span needs a kept gap before it
        return None
    noise, keep = _segments(n_noise, k, rng), _segments(n_keep, k, rng)
    inputs, targets, spans = [], [sp.sep], []
    pos = 0
    for i in range(k):
        inputs += tokens[pos:pos + keep[i]].tolist() + [sp.sentinels[i]]
        pos += keep[i]
        targets += [sp.sentinels[i]] + tokens[pos:pos + noise[i]].tolist()
        spans.append((pos, pos + noise[i]))
        pos += noise[i]
    out = np.asarray(inputs + targets, dtype=np.int64)
    assert len(out) == n and pos == m
    return SpanResult(out, tuple(spans), m)


def restore(tokens, sp: SpanTokens) -> list[int]:
    """Inverse of :func:`corrupt`: the original tokens a span-corrupted slice covers. For tests/debugging."""
    toks = [int(t) for t in tokens]
    if sp.sep not in toks:
        raise ValueError("not a span-corruption slice: no separator")
    cut = toks.index(sp.sep)
    inputs, targets = toks[:cut], toks[cut + 1:]
    sentinel = set(sp.sentinels)
    fill: dict[int, list[int]] = {}
    current = None
    for t in targets:
        if t in sentinel:
            current = fill.setdefault(t, [])
        elif current is None:
            raise ValueError("not a span-corruption slice: targets do not start with a sentinel")
        else:
            current.append(t)
    out = []
    for t in inputs:
        out += fill[t] if t in sentinel else [t]
    return out
