"""`ownllm repro probe`: a few seeded AdamW steps of a tiny Llama, and the hash of the weights they give.

The probe isolates floating point from everything else: no data, tokenizer or checkpoint, only the kernels a
training step runs (matmul, RMSNorm, RoPE, softmax, SiLU, cross-entropy, gradient clipping, AdamW). Run it on two
machines with the same params: equal ``weights_sha256`` means their numerics agree, bit for bit; the record says
what each one used. tests/pipeline/test_numerics.py runs it under every kernel dispatch this CPU can emulate.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pipeline.config import Params

VOCAB, SEQ, BATCH = 512, 64, 8


def run_probe(params: Params, steps: int = 30) -> dict[str, Any]:
    from pipeline import numerics

    numerics.apply(params.numerics)  # before any torch work: the inter-op pool can only be sized once
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(params.seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(params.seed)
    losses = []
    for _ in range(steps):
        batch = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().contiguous().numpy().tobytes())
    return {"steps": steps, "final_loss": losses[-1], "weights_sha256": h.hexdigest(),
            "numerics": numerics.record(params.numerics, "cpu"), "machine": numerics.machine()}


def main(args) -> int:
    from pipeline.config import load_params

    params = load_params(args.params)
    print(json.dumps(run_probe(params, args.steps), sort_keys=True))
    return 0
