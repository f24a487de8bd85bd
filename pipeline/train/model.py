"""The model: a Hugging Face ``LlamaForCausalLM`` sized by params.yaml, wrapped for Composer.

We write no transformer of our own. The vocabulary comes from the tokenizer; the special-token ids
(eos, pad = ``<fim_pad>``) are written into the config so the exported model generates correctly.
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.config import ModelConfig
from pipeline.train.fim import has_targets


def intermediate_size(cfg: ModelConfig) -> int:
    """Llama's SwiGLU width: 8/3 of d_model, rounded up to a multiple of 64."""
    if cfg.intermediate_size:
        return cfg.intermediate_size
    return 64 * -(-(8 * cfg.d_model // 3) // 64)


def build_model(cfg: ModelConfig, tokenizer, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.d_model,
        intermediate_size=intermediate_size(cfg),
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.max_seq_len,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_word_embeddings,
        initializer_range=cfg.init_std,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )
    # Initialisation is part of the run: seed it from params, independently of anything imported before.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(hf_cfg)


def flops_per_token(model, seq_len: int) -> int:
    """Training FLOPs per token, llm-foundry style: 6 x parameters + attention scores (fwd + 2x bwd)."""
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    if not cfg.tie_word_embeddings:  # an untied input embedding is a lookup, not a matmul
        n_params -= model.get_input_embeddings().weight.numel()
    attn = 2 * 2 * cfg.num_hidden_layers * cfg.hidden_size * seq_len
    return 3 * (2 * n_params + attn)


def composer_model(model, tokenizer):
    """Composer's HuggingFaceModel with LM metrics and ``flops_per_batch`` for SpeedMonitor's MFU."""
    from composer.metrics.nlp import LanguageCrossEntropy, LanguagePerplexity
    from composer.models import HuggingFaceModel

    class CausalLM(HuggingFaceModel):
        def loss(self, outputs, batch):
            # A microbatch with no label left (all <fim_pad>: masked, excluded documents) has no mean loss;
            # Hugging Face's would be NaN and poison the whole step's gradients. It contributes nothing instead.
            labels = batch.get("labels") if isinstance(batch, dict) else None
            if labels is not None and not has_targets(labels):
                return outputs["logits"].sum() * 0.0
            return super().loss(outputs, batch)

        def flops_per_batch(self, batch: dict[str, Any]) -> int:
            bs, seq = batch["input_ids"].shape
            return flops_per_token(self.model, seq) * bs * seq

    return CausalLM(model, tokenizer=tokenizer, use_logits=True, shift_labels=True,
                    metrics=[LanguageCrossEntropy()], eval_metrics=[LanguageCrossEntropy(), LanguagePerplexity()])


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())
