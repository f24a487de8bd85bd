"""The FIM transform on real stdlib code: lossless, at the configured rates, in the exact PSM/SPM layouts."""

from __future__ import annotations

import numpy as np
import pytest
from train_helpers import SEQ_LEN, TWO_DOC_SPANS, collated_windows

from pipeline.train.data import Collator
from pipeline.train.fim import IGNORE_INDEX, Codec, FimTokens, parse_fim, permute


def test_round_trip_reconstructs_every_slice(tok, stdlib_docs):
    codec, fim = Codec(tok), FimTokens.from_tokenizer(tok)
    rng = np.random.default_rng(0)
    checked = refused = 0
    for doc in stdlib_docs:
        for start in range(0, len(doc) - 200, 97):
            ids = doc[start:start + 200]
            text = codec.decode(ids)
            res = permute(text, codec, fim, len(ids), rng, spm_rate=0.5)
            if res is None:  # prefix + middle + sentinels alone exceed the slice: it stays next-token
                refused += 1
                continue
            assert len(res.tokens) == len(ids)
            prefix, middle, suffix, spm = parse_fim(res.tokens, fim)
            assert spm == res.spm
            lo, hi = res.cut
            head = codec.decode(middle)  # SPM: the kept prefix and the middle, contiguous
            assert head.endswith(text[lo:hi])  # the middle is always whole
            kept_prefix = head[:len(head) - (hi - lo)] if spm else codec.decode(prefix)
            kept_suffix = codec.decode(suffix)
            assert text[:lo].endswith(kept_prefix) and text[hi:].startswith(kept_suffix)
            if res.truncated == 0:
                assert kept_prefix + text[lo:hi] + kept_suffix == text  # the document, character for character
            assert "\ufffd" not in kept_prefix + kept_suffix or "\ufffd" in text  # cuts at character boundaries
            checked += 1
    assert checked > 50 and refused < checked / 4


def test_psm_and_spm_layouts_exact(tok):
    codec, fim = Codec(tok), FimTokens.from_tokenizer(tok)
    text = "def add(a, b):\n    return a + b\n"
    n = 40
    for spm_rate, want_spm in ((0.0, False), (1.0, True)):
        rng = np.random.default_rng(3)
        res = permute(text, codec, fim, n, rng, spm_rate)
        lo, hi = res.cut
        p, m, s = codec.encode([text[:lo], text[lo:hi], text[hi:]])
        if want_spm:
            body = [fim.prefix, fim.suffix, *s, fim.middle, *p, *m]
        else:
            body = [fim.prefix, *p, fim.suffix, *s, fim.middle, *m]
        assert res.spm is want_spm
        assert res.tokens.tolist() == body + [fim.pad] * (n - len(body))


def test_too_long_truncates_suffix_or_refuses(tok):
    codec, fim = Codec(tok), FimTokens.from_tokenizer(tok)
    text = "x = 1\n" * 20
    ids = codec.encode([text])[0]
    # Exactly the original length: the three sentinels (and broken merges) come out of the suffix first, then
    # the start of the prefix; the middle is never cut.
    results = [permute(text, codec, fim, len(ids), np.random.default_rng(seed), 0.0) for seed in range(20)]
    fitted = [r for r in results if r is not None]
    assert len(fitted) >= 10, "most random cuts leave room for the sentinels"
    for res in fitted:
        assert len(res.tokens) == len(ids) and res.truncated >= 3
        prefix, middle, suffix, _ = parse_fim(res.tokens, fim)
        lo, hi = res.cut
        assert codec.decode(middle) == text[lo:hi]
        assert text[hi:].startswith(codec.decode(suffix)) and text[:lo].endswith(codec.decode(prefix))
        if len(codec.decode(suffix)) < len(text[hi:]) and codec.decode(prefix) != text[:lo]:
            assert suffix == [], "the prefix is cut only once the suffix is gone"
    # Too small for the sentinels plus prefix and middle: stays next-token.
    assert permute(text, codec, fim, 2, np.random.default_rng(0), 0.0) is None


def test_rates_within_tolerance_and_pads_masked(tok, stdlib_docs):
    collate = Collator(tok, seed=5, fim_rate=0.5, spm_rate=0.25, min_tokens=8)
    fim = collate.fim
    n_docs = n_fim = n_spm = 0
    for _tokens, batch in collated_windows(collate, stdlib_docs):
        ids = batch["input_ids"][0]
        assert ids.shape == (SEQ_LEN,)
        assert ((ids == fim.pad) == (batch["labels"][0] == IGNORE_INDEX)).all()
        for _, _, s0, n in TWO_DOC_SPANS:
            n_docs += 1
            part = ids[s0:s0 + n].tolist()
            if part[0] == fim.prefix:
                n_fim += 1
                n_spm += part[1] == fim.suffix
    assert abs(n_fim / n_docs - 0.5) < 0.05  # 800 documents: 3.5 sigma
    assert abs(n_spm / n_fim - 0.25) < 0.07


def test_fim_is_a_pure_function_of_seed_and_sample_index(tok, stdlib_docs):
    tokens = stdlib_docs[0][:SEQ_LEN].astype(np.int32)
    spans = [["a", 0, 0, SEQ_LEN]]
    a = Collator(tok, seed=1, fim_rate=1.0, spm_rate=0.5, min_tokens=8)
    b = Collator(tok, seed=1, fim_rate=1.0, spm_rate=0.5, min_tokens=8)
    outs = {i: a.transform(tokens, spans, i)[0].tolist() for i in range(20)}
    assert all(b.transform(tokens, spans, i)[0].tolist() == outs[i] for i in reversed(range(20)))
    assert len({tuple(v) for v in outs.values()}) > 10  # and it does depend on the index
    other_seed = Collator(tok, seed=2, fim_rate=1.0, spm_rate=0.5, min_tokens=8)
    assert any(other_seed.transform(tokens, spans, i)[0].tolist() != outs[i] for i in range(20))


def test_missing_fim_tokens_is_a_clear_error():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    bare = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()), unk_token=None)
    with pytest.raises(ValueError, match="<fim_prefix>"):
        FimTokens.from_tokenizer(bare)
