"""Evaluation's generation ends where serving's does: at end-of-text or at any FIM control token."""

from __future__ import annotations

import pytest
import torch

from pipeline.eval.generate import GenerationSettings, generate, load_model
from pipeline.fim_prompt import EOS, FIM_MIDDLE, FIM_PAD, FIM_PREFIX, FIM_SUFFIX, end_token_ids


class ScriptedHead(torch.nn.Module):
    """An output layer that makes the model write ``script`` token by token (its last token from then on).

    A tiny trained model rarely writes a FIM control token in the middle of a completion, which is the case
    under test; this head makes the real model, tokenizer and ``model.generate`` do exactly that."""

    def __init__(self, vocab_size: int, script: list[int]):
        super().__init__()
        self.vocab_size, self.script, self.calls = vocab_size, script, 0

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        token = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1  # one forward per generated token (one prompt, so no padding rows)
        logits = torch.full((*hidden.shape[:2], self.vocab_size), -1e4)
        logits[..., token] = 0.0
        return logits


@pytest.mark.parametrize("end", [EOS, FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE, FIM_PAD])
def test_a_completion_ends_at_any_end_token(tiny_model_dir, end):
    model, tok = load_model(tiny_model_dir)
    x, y, stop = tok.convert_tokens_to_ids(["x", "y", end])
    model.lm_head = ScriptedHead(model.config.vocab_size, [x, x, stop, y])
    model.config.tie_word_embeddings = False
    settings = GenerationSettings(max_new_tokens=8, batch_size=1)
    assert generate(model, tok, ["def f():\n    return "], settings) == ["xx"]


def test_serving_stops_at_the_same_tokens(tiny_model_dir):
    from transformers import AutoTokenizer

    from feedback.backends import LocalBackend

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    want = sorted(tok.convert_tokens_to_ids([EOS, FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE, FIM_PAD]))
    assert end_token_ids(tok) == want
    assert LocalBackend(tiny_model_dir).stop_ids == want
