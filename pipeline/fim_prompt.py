"""The one FIM prompt builder: serving, evaluation, the feedback snapshot and tuning all build prompts here.

Layout (PSM, what pretraining teaches — pipeline/train/fim.py):

    <fim_prefix> prefix <fim_suffix> suffix <fim_middle>          (then the model writes the middle)

A plain prompt (no suffix) is ``<|endoftext|> prefix``: documents start after end-of-text in training.

Truncation happens *inside* the sentinel structure and in token space, keeping the text nearest the cursor
(the end of the prefix, the start of the suffix), so a long context can never lose a sentinel — cutting the
rendered string from the left (what tuning used to do) dropped ``<fim_prefix>`` and taught the model a prompt
format it never sees when served. The suffix gets at most ``suffix_share`` of the room unless the prefix is
shorter than its share, as in StarCoder/Tabby's prompt budgets.

Written by hand because neither tokenizers nor transformers know FIM layouts; TRL takes prompts as text, so
:meth:`FimPromptBuilder.text` renders the same token layout back to a string whose sentinels re-tokenise to the
same control tokens.
"""

from __future__ import annotations

from pipeline.tokenizer import EOS, FIM_MIDDLE, FIM_PAD, FIM_PREFIX, FIM_SUFFIX, SPECIAL_TOKENS

__all__ = ["EOS", "FIM_MIDDLE", "FIM_PAD", "FIM_PREFIX", "FIM_SUFFIX", "SPECIAL_TOKENS", "FimPromptBuilder",
           "NoFimTokens", "PromptTooLong", "END_TOKENS", "end_token_ids", "fim_text", "parse_fim_text"]
FIM_TOKENS = (FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE)

MIN_PROMPT_TOKENS = 8  # below this a completion has no context worth the name


# What ends a completion, in serving and in evaluation alike: end-of-text, and any FIM control token (the
# middle is over; what a model writes after one is not part of it).
END_TOKENS = (EOS, FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE, FIM_PAD)


def end_token_ids(tok) -> list[int]:
    """The ids of :data:`END_TOKENS` (and the tokenizer's own end-of-text) that ``tok`` has, sorted."""
    vocab = tok.get_vocab()
    ids = {vocab.get(t) for t in END_TOKENS} | {getattr(tok, "eos_token_id", None)}
    return sorted(i for i in ids if i is not None)


class PromptTooLong(ValueError):
    """``max_new_tokens`` leaves no room for a prompt in the model's context."""


class NoFimTokens(ValueError):
    """The tokenizer has no FIM sentinels, so a suffix cannot be used."""


def fim_text(prefix: str, suffix: str) -> str:
    """The PSM prompt as a string, untruncated: for servers that take a templated prompt (vLLM, TGI)."""
    return f"{FIM_PREFIX}{prefix}{FIM_SUFFIX}{suffix}{FIM_MIDDLE}"


def parse_fim_text(text: str) -> tuple[str, str] | None:
    """(prefix, suffix) of a PSM prompt string made by :func:`fim_text`; None for a plain prompt."""
    if not (text.startswith(FIM_PREFIX) and text.endswith(FIM_MIDDLE) and FIM_SUFFIX in text):
        return None
    prefix, suffix = text[len(FIM_PREFIX):-len(FIM_MIDDLE)].split(FIM_SUFFIX, 1)
    return prefix, suffix


class FimPromptBuilder:
    """Builds prompts for one tokenizer and context length.

    ``context_tokens`` is the model's context (``max_position_embeddings``); each call says how many new
    tokens it will generate (or, for tuning, how long the longest completion is), and the prompt gets the rest.
    """

    def __init__(self, tok, context_tokens: int, suffix_share: float = 1 / 3):
        if not 0 <= suffix_share <= 1:
            raise ValueError(f"suffix_share must be within [0, 1], got {suffix_share}")
        self.tok, self.context_tokens, self.suffix_share = tok, int(context_tokens), suffix_share
        vocab = tok.get_vocab()
        self.sentinel_ids = {t: vocab.get(t) for t in FIM_TOKENS}
        eos = getattr(tok, "eos_token_id", None)
        self.eos_id = eos if eos is not None else vocab.get(EOS)

    @property
    def has_fim(self) -> bool:
        return all(v is not None for v in self.sentinel_ids.values())

    def encode(self, text: str) -> list[int]:
        # split_special_tokens: text a user typed (a file about tokenizers, say) is never read as a control
        # token, so a prompt cannot end the document or forge a FIM boundary.
        return self.tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] if text else []

    def budget(self, max_new_tokens: int) -> int:
        room = self.context_tokens - int(max_new_tokens)
        if room < MIN_PROMPT_TOKENS:
            raise PromptTooLong(f"max_tokens={max_new_tokens} leaves no room for a prompt in this model's context "
                                f"of {self.context_tokens} tokens")
        return room

    def _parts(self, prefix: str, suffix: str | None, max_new_tokens: int) -> tuple[list[int], list[int] | None]:
        """The kept prefix and suffix token ids (suffix None = a plain prompt)."""
        room = self.budget(max_new_tokens)
        p = self.encode(prefix)
        if not suffix:
            keep = room - (1 if self.eos_id is not None else 0)
            return (p[-keep:] if keep > 0 else []), None
        if not self.has_fim:
            raise NoFimTokens("this model has no FIM tokens, so a suffix cannot be used")
        s = self.encode(suffix)
        room -= len(FIM_TOKENS)
        s_room = min(len(s), max(int(room * self.suffix_share), room - len(p)))
        p_room = room - s_room
        return (p[-p_room:] if p_room > 0 else []), s[:s_room]

    def ids(self, prefix: str, suffix: str | None, max_new_tokens: int) -> list[int]:
        """Token ids of the prompt, fitted to the context; every sentinel present whatever the lengths."""
        p, s = self._parts(prefix, suffix, max_new_tokens)
        if s is None:
            return ([self.eos_id] if self.eos_id is not None else []) + p
        ids = self.sentinel_ids
        return [ids[FIM_PREFIX], *p, ids[FIM_SUFFIX], *s, ids[FIM_MIDDLE]]

    def fit(self, prefix: str, suffix: str | None, max_new_tokens: int) -> tuple[str, str]:
        """The prefix and suffix texts that :meth:`ids` keeps (whole tokens, decoded)."""
        p, s = self._parts(prefix, suffix, max_new_tokens)
        return self.tok.decode(p), (self.tok.decode(s) if s else "")

    def text(self, prefix: str, suffix: str | None, max_new_tokens: int) -> str:
        """The prompt as text, sentinels included (TRL datasets, text-prompt generation, upstream servers).

        The plain form is the prefix alone: TRL's trainers and text generation tokenise text as given, with no
        end-of-text in front. Decoded text can re-tokenise to a token or two more than the ids it came from
        (BPE merges across the cut), so the result is re-checked and trimmed until it fits: a consumer that
        cuts an over-long prompt from the left would otherwise drop ``<fim_prefix>``.
        """
        room = self.budget(max_new_tokens) - (1 if not suffix and self.eos_id is not None else 0)
        slack = 0
        while True:
            p, s = self.fit(prefix, suffix, max_new_tokens + slack)
            out = fim_text(p, s) if suffix else p
            n = len(self.tok(out, add_special_tokens=False)["input_ids"])
            if n <= room or room - slack < MIN_PROMPT_TOKENS:
                return out
            slack += n - room
