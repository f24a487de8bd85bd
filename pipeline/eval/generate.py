"""Batched generation with a KV cache for evaluation (HumanEval samples, FIM and next-line completions).

Prompts are sorted by length and cut into batches so that left padding wastes little; each batch runs
one ``model.generate`` call (KV cache on, per-row stop strings), and results come back in input order.
A completion ends where a served one ends: at end-of-text or any FIM control token
(:func:`pipeline.fim_prompt.end_token_ids`, which the gateway's backends use too), or at a stop string.
Sampling is seeded per batch from params, so a rerun reproduces every sample.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from pipeline.fim_prompt import end_token_ids


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_p: float = 0.95
    batch_size: int = 16
    seed: int = 0
    stop: tuple[str, ...] = ()
    # Text the completion may start with before stop strings apply: "\n" for line tasks, whose prompt ends
    # at the end of the previous line (a bare trailing "\n" in the prompt is a token boundary the model
    # rarely saw, since BPE merges newlines with the indentation after them).
    leading: str = ""
    use_cache: bool = True


@dataclass
class GenerationStats:
    prompts: int = 0
    new_tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0


def load_model(model_dir: str | Path, num_threads: int | None = None):
    """An exported HF model directory and its tokenizer, from local files only, ready for left-padded batches."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no model at {path} (expected an HF directory with config.json; run `ownllm train export`)")
    if num_threads:
        torch.set_num_threads(num_threads)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    model.eval()
    return model, tok


def truncate_at_stop(text: str, stop: Sequence[str], leading: str = "") -> str:
    """Cut at the first stop string, not counting an optional ``leading`` text."""
    head = leading if leading and text.startswith(leading) else ""
    rest = text[len(head):]
    cut = min((i for i in (rest.find(s) for s in stop) if i >= 0), default=len(rest))
    return head + rest[:cut]


def _stop_criteria(tok, prompt_len: int, stop: Sequence[str], leading: str):
    """Per-row stop on strings (transformers' ``stop_strings`` has no notion of ``leading``)."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopOnStrings(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            texts = tok.batch_decode(input_ids[:, prompt_len:], skip_special_tokens=True)
            return torch.tensor([truncate_at_stop(t, stop, leading) != t for t in texts], dtype=torch.bool)

    return StoppingCriteriaList([StopOnStrings()])


def mean_logprob(tok, ids: list[int], logprobs: list[float], text: str, pad_id: int | None) -> float:
    """Mean log-probability of the generated tokens that make up ``text`` (the completion as returned, cut
    at its stop string): the model's confidence in what it showed, a feature of the suggestion filter.
    The gateway's engines call this same function on their own generations (feedback/backends.py,
    feedback/engine.py), so the filter sees the same feature in training and serving."""
    total, n = 0.0, 0
    for m, (t, lp) in enumerate(zip(ids, logprobs), 1):
        if t == pad_id or t == tok.eos_token_id:
            break
        total, n = total + lp, n + 1
        if len(tok.decode(ids[:m], skip_special_tokens=True)) >= len(text):
            break
    return total / n if n else 0.0


def generate(model, tok, prompts: Sequence[str], settings: GenerationSettings, desc: str = "generate",
             stats: GenerationStats | None = None, logprobs: list[float] | None = None) -> list[str]:
    """Completions of ``prompts`` (new text only, cut at the first end token or stop string).

    ``logprobs``: a list to receive, per prompt and in input order, the mean log-probability of the
    completion's tokens (``model.compute_transition_scores``)."""
    import torch

    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    out: list[str] = [""] * len(prompts)
    lp: list[float] = [0.0] * len(prompts)
    batches = [order[i:i + settings.batch_size] for i in range(0, len(order), settings.batch_size)]
    max_len = getattr(model.config, "max_position_embeddings", None)
    ends = end_token_ids(tok)
    start = time.perf_counter()
    for b, idx in enumerate(tqdm(batches, desc=desc, unit="batch", leave=False, disable=None)):
        enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}  # no token_type_ids
        if max_len and enc["input_ids"].shape[1] + settings.max_new_tokens > max_len:
            keep = max(1, max_len - settings.max_new_tokens)  # keep the end of the prompt: it is what gets continued
            enc = {k: v[:, -keep:] for k, v in enc.items()}
        kwargs = dict(max_new_tokens=settings.max_new_tokens, use_cache=settings.use_cache,
                      pad_token_id=tok.pad_token_id, eos_token_id=ends)
        if settings.stop:
            kwargs.update(stopping_criteria=_stop_criteria(tok, enc["input_ids"].shape[1], settings.stop,
                                                           settings.leading))
        if settings.temperature > 0:
            kwargs.update(do_sample=True, temperature=settings.temperature, top_p=settings.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if logprobs is not None:
            kwargs.update(output_scores=True, return_dict_in_generate=True)
        torch.manual_seed(settings.seed + b)
        with torch.inference_mode():
            res = model.generate(**enc, **kwargs)
            seqs = res.sequences if logprobs is not None else res
            scores = (model.compute_transition_scores(res.sequences, res.scores, normalize_logits=True).tolist()
                      if logprobs is not None else None)
        new = seqs[:, enc["input_ids"].shape[1]:]
        for row, i in enumerate(idx):
            ids = new[row].tolist()
            ids = ids[:next((k for k, t in enumerate(ids) if t in ends), len(ids))]
            if stats is not None:
                stats.new_tokens += len(ids)
            text = tok.decode(ids, skip_special_tokens=True)
            out[i] = truncate_at_stop(text, settings.stop, settings.leading)
            if scores is not None:
                lp[i] = mean_logprob(tok, ids, scores[row], out[i], tok.pad_token_id)
    if stats is not None:
        stats.prompts += len(prompts)
        stats.seconds += time.perf_counter() - start
    if logprobs is not None:
        logprobs[:] = lp
    return out
