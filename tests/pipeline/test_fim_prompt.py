"""The one FIM prompt builder: layout, truncation inside the sentinels, and every consumer using it."""

from __future__ import annotations

import pytest

from pipeline.fim_prompt import (FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX, FimPromptBuilder, PromptTooLong, fim_text,
                                 parse_fim_text)
from tests.conftest import stdlib_files

TEXT = stdlib_files(["textwrap.py"])["textwrap.py"]
CUT = 6000  # the cursor: far more context on both sides than a 128-token window holds


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def sentinel_ids(tok) -> dict[str, int]:
    return {t: tok.convert_tokens_to_ids(t) for t in (FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE)}


def test_fim_text_is_psm_and_parses_back():
    text = fim_text("def f(x):\n", "\n    return y\n")
    assert text == "<fim_prefix>def f(x):\n<fim_suffix>\n    return y\n<fim_middle>"
    assert parse_fim_text(text) == ("def f(x):\n", "\n    return y\n")
    assert parse_fim_text("def f(x):\n") is None


def test_a_long_context_keeps_all_three_sentinels_and_the_text_nearest_the_cursor(tok):
    b = FimPromptBuilder(tok, context_tokens=128)
    ids = b.ids(TEXT[:CUT], TEXT[CUT:], max_new_tokens=16)
    fim = sentinel_ids(tok)
    assert len(ids) <= 128 - 16
    assert ids[0] == fim[FIM_PREFIX] and ids[-1] == fim[FIM_MIDDLE] and ids.count(fim[FIM_SUFFIX]) == 1
    s = ids.index(fim[FIM_SUFFIX])
    prefix, suffix = tok.decode(ids[1:s]), tok.decode(ids[s + 1:-1])
    assert len(prefix) > 40 and TEXT[:CUT].endswith(prefix)  # the end of the prefix, verbatim
    assert len(suffix) > 20 and TEXT[CUT:].startswith(suffix)  # the start of the suffix, verbatim
    assert len(ids[s + 1:-1]) <= (128 - 16 - 3) // 3 + 1  # the suffix gets at most its share


def test_a_short_prefix_lends_its_room_to_the_suffix(tok):
    b = FimPromptBuilder(tok, context_tokens=128)
    ids = b.ids("x = ", TEXT[CUT:], max_new_tokens=16)
    assert len(ids) == 128 - 16  # the room is used, mostly by the suffix
    assert tok.decode(ids[1:3]).startswith("x =")


def test_text_form_retokenises_to_the_same_structure_and_fits(tok):
    b = FimPromptBuilder(tok, context_tokens=128)
    text = b.text(TEXT[:CUT], TEXT[CUT:], max_new_tokens=16)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    fim = sentinel_ids(tok)
    assert len(ids) <= 128 - 16 and ids[0] == fim[FIM_PREFIX] and ids[-1] == fim[FIM_MIDDLE]
    plain = b.text(TEXT[:CUT], None, max_new_tokens=16)
    assert FIM_PREFIX not in plain and TEXT[:CUT].endswith(plain) and len(tok(plain)["input_ids"]) < 128 - 16


def test_typed_text_cannot_forge_a_sentinel(tok):
    b = FimPromptBuilder(tok, context_tokens=128)
    ids = b.ids("s = '<fim_middle>'\n", "\n", max_new_tokens=16)
    assert ids.count(sentinel_ids(tok)[FIM_MIDDLE]) == 1


def test_no_room_for_a_prompt_is_a_clear_error(tok):
    with pytest.raises(PromptTooLong, match="max_tokens=125"):
        FimPromptBuilder(tok, context_tokens=128).ids("x", "y", max_new_tokens=125)


def test_tuning_prompts_keep_their_sentinels(tok):
    """The DPO bug: tune.fit_prompts cut the rendered FIM string from the left, losing <fim_prefix>."""
    from rlhf.snapshot import render_prompt
    from rlhf.tune import fit_prompts

    prompt = render_prompt(TEXT[:CUT], TEXT[CUT:], max_chars=4000)
    rows = fit_prompts([{"prompt": prompt, "chosen": "    return 1\n", "rejected": "pass\n"}], tok, 128,
                       ["chosen", "rejected"])
    ids = tok(rows[0]["prompt"], add_special_tokens=False)["input_ids"]
    fim = sentinel_ids(tok)
    longest = max(len(tok(r, add_special_tokens=False)["input_ids"]) for r in ("    return 1\n", "pass\n"))
    assert ids[0] == fim[FIM_PREFIX] and ids[-1] == fim[FIM_MIDDLE] and fim[FIM_SUFFIX] in ids
    assert len(ids) + longest + 1 <= 128
    assert parse_fim_text(rows[0]["prompt"])[0] and TEXT[:CUT].endswith(parse_fim_text(rows[0]["prompt"])[0])
