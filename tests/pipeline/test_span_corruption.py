"""UL2-style span corruption on real stdlib code: lossless, exact layout, at the configured rates, seeded."""

from __future__ import annotations

import numpy as np
import pytest
from train_helpers import SEQ_LEN, TWO_DOC_SPANS, collated_windows

from pipeline.config import ParamsError, parse_params
from pipeline.train.data import Collator
from pipeline.train.span_corruption import SpanTokens, corrupt, restore


def test_sentinels_are_the_reserved_tokens(tok):
    sp = SpanTokens.from_tokenizer(tok)
    assert tok.convert_ids_to_tokens(sp.sep) == "<|reserved_0|>"
    assert tok.convert_ids_to_tokens(list(sp.sentinels)) == [f"<|reserved_{i}|>" for i in range(1, 1 + len(sp.sentinels))]
    assert len(sp.sentinels) >= 2


def test_round_trip_restores_every_slice(tok, stdlib_docs):
    sp = SpanTokens.from_tokenizer(tok)
    rng = np.random.default_rng(0)
    checked = 0
    for doc in stdlib_docs:
        for start in range(0, len(doc) - 200, 89):
            ids = doc[start:start + 200]
            res = corrupt(ids, sp, rng)
            assert len(res.tokens) == len(ids)
            assert restore(res.tokens, sp) == ids[:res.kept].tolist()  # token for token
            assert res.kept == len(ids) - 2 * len(res.spans) - 1
            masked = sum(b - a for a, b in res.spans)
            assert abs(masked - 0.15 * res.kept) <= 1 and all(b > a for a, b in res.spans)
            assert res.spans[0][0] > 0  # the slice starts with kept text, gaps are never empty
            assert all(res.spans[i][1] < res.spans[i + 1][0] for i in range(len(res.spans) - 1))
            checked += 1
    assert checked > 50


def test_layout_exact(tok):
    sp = SpanTokens.from_tokenizer(tok)
    ids = np.arange(100, 140)  # 40 tokens, mean span 4, density 0.3 → 3 spans, 33 tokens kept, 10 masked
    res = corrupt(ids, sp, np.random.default_rng(3), noise_density=0.3, mean_span=4)
    (a0, b0), (a1, b1), (a2, b2) = res.spans
    s0, s1, s2 = sp.sentinels[:3]
    want = [*range(100, 100 + a0), s0, *range(100 + b0, 100 + a1), s1, *range(100 + b1, 100 + a2), s2,
            sp.sep, s0, *range(100 + a0, 100 + b0), s1, *range(100 + a1, 100 + b1), s2, *range(100 + a2, 100 + b2)]
    assert res.kept == 33 and b2 == 33 and sum(b - a for a, b in res.spans) == 10
    assert res.tokens.tolist() == want


def test_span_count_is_capped_by_the_sentinels_and_short_slices_are_refused(tok):
    sp = SpanTokens.from_tokenizer(tok)
    res = corrupt(np.arange(1000, 3000), sp, np.random.default_rng(0), noise_density=0.5, mean_span=3)
    assert len(res.spans) == len(sp.sentinels)
    assert corrupt(np.arange(100, 104), sp, np.random.default_rng(0)) is None  # 1 span needs 3 extra tokens + a gap


def test_mixed_rates_within_tolerance(tok, stdlib_docs):
    collate = Collator(tok, seed=5, fim_rate=0.3, spm_rate=0.5, min_tokens=8, span_rate=0.4)
    fim, sp = collate.fim, collate.span_tokens
    counts = {"fim": 0, "span": 0, "next": 0}
    n_fim = n_span = 0
    for tokens, batch in collated_windows(collate, stdlib_docs):
        ids = batch["input_ids"][0]
        n_fim += int(batch["fim_docs"][0])
        n_span += int(batch["span_docs"][0])
        for _, _, s0, n in TWO_DOC_SPANS:
            part = ids[s0:s0 + n].tolist()
            kind = "fim" if part[0] == fim.prefix else "span" if sp.sep in part else "next"
            counts[kind] += 1
            if kind == "span":
                restored = restore(part, sp)
                assert restored == tokens[s0:s0 + len(restored)].tolist()
    assert (counts["fim"], counts["span"]) == (n_fim, n_span)  # the batch's counts are what it holds
    assert abs(counts["fim"] / 800 - 0.3) < 0.06 and abs(counts["span"] / 800 - 0.4) < 0.06


def test_zero_rate_leaves_the_fim_stream_unchanged(tok, stdlib_docs):
    """At rate 0 the collator must make exactly the draws the FIM-only collator made (one per document, then
    the FIM cut), so runs from before span corruption existed stay bit-identical. The reference below is
    that FIM-only loop, written out."""
    from pipeline.train.fim import permute

    tokens = stdlib_docs[1][:SEQ_LEN].astype(np.int32)
    spans = TWO_DOC_SPANS
    new = Collator(tok, seed=9, fim_rate=0.5, spm_rate=0.5, min_tokens=8, span_rate=0.0, span_mean=5.0)
    n_fim = 0
    for i in range(30):
        rng = np.random.default_rng([9, i])
        want = tokens.astype(np.int64).copy()
        for _, _, start, n in spans:
            if rng.random() >= 0.5 or n < 8:
                continue
            res = permute(new.codec.decode(tokens[start:start + n]), new.codec, new.fim, n, rng, 0.5)
            if res is not None:
                want[start:start + n] = res.tokens
                n_fim += 1
        assert new.transform(tokens, spans, i)[0].tolist() == want.tolist()
    assert n_fim > 10  # FIM really happened in the compared samples


def test_span_corruption_is_a_pure_function_of_seed_and_sample_index(tok, stdlib_docs):
    tokens = stdlib_docs[0][:SEQ_LEN].astype(np.int32)
    spans = [["a", 0, 0, SEQ_LEN]]
    a = Collator(tok, seed=1, fim_rate=0.0, spm_rate=0.5, min_tokens=8, span_rate=1.0)
    b = Collator(tok, seed=1, fim_rate=0.0, spm_rate=0.5, min_tokens=8, span_rate=1.0)
    outs = {i: a.transform(tokens, spans, i)[0].tolist() for i in range(20)}
    assert all(b.transform(tokens, spans, i)[0].tolist() == outs[i] for i in reversed(range(20)))
    assert len({tuple(v) for v in outs.values()}) > 10


def test_params_validate_the_mix():
    src = {"sources": [{"name": "x", "kind": "dir", "path": "."}]}
    ok = parse_params({"data": src, "train": {"fim_rate": 0.5, "span_corruption_rate": 0.25}})
    assert ok.train.span_corruption_rate == 0.25
    with pytest.raises(ParamsError, match="fim_rate \\+ span_corruption_rate"):
        parse_params({"data": src, "train": {"fim_rate": 0.7, "span_corruption_rate": 0.5}})
    with pytest.raises(ParamsError, match="span_noise_density"):
        parse_params({"data": src, "train": {"span_noise_density": 1.0}})


def test_a_tokenizer_without_reserved_tokens_is_a_clear_error():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    bare = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()), unk_token=None)
    with pytest.raises(ValueError, match="reserved_tokens >= 2"):
        SpanTokens.from_tokenizer(bare)
