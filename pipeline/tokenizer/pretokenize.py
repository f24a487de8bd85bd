"""Pre-tokenisation fit for source code, and the GPT-2 default it is measured against.

Byte-level BPE only merges inside pre-tokens, so the split regex decides what a token can be. The
GPT-2 regex (``ByteLevel``'s default) was written for English prose. For code we change three things,
in the spirit of the GPT-4 (cl100k) pattern:

* a word may carry one leading non-letter (``.append``, ``_name``, `` self``), so attribute access
  and snake_case pieces become single tokens;
* a punctuation run absorbs the line breaks after it (``):\\n``, ``{\\n``), the commonest line ends;
* digits are split one by one (as StarCoder and LLaMA do), so numbers never eat vocabulary; a
  space before a number joins its first digit.

Whitespace keeps GPT-2's ``\\s+(?!\\S)`` rule: a newline plus an indentation run (minus its last space,
which goes to the next word) is ONE pre-token, so BPE learns whole indentation levels instead of
spending a token per space or tab. reports/tokenizer.json measures both effects on held-out code.
"""

from __future__ import annotations

from tokenizers import Regex, pre_tokenizers

CODE_SPLIT_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?\p{L}+"  # word, with one optional leading space / punctuation / underscore
    r"| ?\p{N}"  # single digits (a leading space joins the first)
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*"  # punctuation run, with the newlines that end its line
    r"|\s+(?!\S)"  # whitespace run (newline + indentation), leaving one space for the next word
    r"|\s+"
)


def code_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """Our split, then the byte-to-unicode mapping of ByteLevel without its own (GPT-2) regex."""
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CODE_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False, trim_offsets=False),
    ])


def baseline_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """Default ByteLevel settings (GPT-2 regex, prefix space): the comparison point in the report."""
    return pre_tokenizers.ByteLevel()
