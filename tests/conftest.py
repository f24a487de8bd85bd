"""Shared fixtures: real code, a real tokenizer and a real tiny model trained on real code."""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("OWNLLM_WANDB_MODE", "disabled")  # tests that exercise W&B set it themselves
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
STDLIB = Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(names: list[str]) -> dict[str, str]:
    """Real Python source from the running interpreter's standard library."""
    return {n: (STDLIB / n).read_text(encoding="utf-8") for n in names}


TINY_CORPUS_FILES = ["textwrap.py", "shlex.py", "fnmatch.py", "glob.py", "bisect.py", "heapq.py", "colorsys.py",
                     "keyword.py", "string.py", "numbers.py", "this.py", "reprlib.py", "copy.py", "queue.py"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny Llama (d=64, 2 layers) with its own BPE tokenizer, trained for a few seconds on stdlib code.

    Saved in Hugging Face format (model + tokenizer) so ``AutoModelForCausalLM.from_pretrained`` and
    ``AutoTokenizer.from_pretrained`` load it, exactly like ``models/base/``. It learns enough to emit
    plausible Python tokens; it is for tests of the machinery, not of quality.
    """
    import torch

    from benchmarks.tiny_models import fit_tokenizer, llama

    out = tmp_path_factory.mktemp("tiny_model")
    texts = list(stdlib_files(TINY_CORPUS_FILES).values())
    # The pipeline's tokenizer trainer and model builder (the production special tokens, 16 reserved that take
    # no merges), shared with the benchmarks.
    hf_tok = fit_tokenizer(out, texts, 1024 + 16, reserved_tokens=16)
    model = llama(hf_tok, seed=0, d_model=64, intermediate_size=176, n_layers=2, n_heads=4, n_kv_heads=4,
                  max_seq_len=256)
    ids = []
    for t in texts:
        ids.extend(hf_tok(t)["input_ids"] + [hf_tok.eos_token_id])
    data = torch.tensor(ids)
    seq, bs = 64, 16
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(60):
        starts = torch.randint(0, len(data) - seq - 1, (bs,), generator=g)
        batch = torch.stack([data[s:s + seq] for s in starts])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    model.save_pretrained(out)
    return out


def fim_tune(model_dir: Path, out: Path, cases: list[tuple[str, str, str]], steps: int, max_new_tokens: int,
             max_chars: int, seed: int = 0) -> Path:
    """Train a copy of ``model_dir`` on FIM examples (prefix, suffix, middle) built by the product's prompt
    builder, loss on the middle only, one thread (a tiny model on a shared box: more threads only spin)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.fim_prompt import FimPromptBuilder

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    builder = FimPromptBuilder(tok, model.config.max_position_embeddings)
    examples = [(builder.ids(p[-max_chars:], s[:max_chars], max_new_tokens),
                 tok(m, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]) for p, s, m in cases]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    model.train()
    try:
        for _ in range(steps):
            batch = [examples[i] for i in torch.randint(0, len(examples), (16,), generator=g).tolist()]
            width = max(len(p) + len(m) for p, m in batch)
            ids = torch.full((len(batch), width), tok.pad_token_id)
            labels = torch.full((len(batch), width), -100)
            for r, (p, m) in enumerate(batch):  # right-padded; loss on the middle only
                ids[r, :len(p) + len(m)] = torch.tensor(p + m)
                labels[r, len(p):len(p) + len(m)] = torch.tensor(m)
            model(input_ids=ids, labels=labels).loss.backward()
            opt.step()
            opt.zero_grad()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out

