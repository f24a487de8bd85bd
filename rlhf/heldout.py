"""Held-out simulated acceptance: the simulated IDE user replayed on files the snapshot never saw.

The feedback the snapshot holds comes from the training split; this replay uses the validation split
(``pipeline.data.records.split_of``, via ``pipeline.eval.fim.heldout_docs``), so a tuned model cannot
score by having memorised the very contexts it was tuned on. At each of a few deterministic cursors per
file the model is served the prefix and suffix (PSM, as the gateway does) and the simulated user accepts
when the completion agrees with the real code after the cursor for at least ``min_common_prefix``
characters (or the whole rest of the line, when shorter) — the same rule as ``ownllm feedback simulate``.

The rate comes with a 95% Wilson score interval: with a few dozen cursors the interval is wide, and
the loop report says so instead of presenting a point estimate as a result.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass

from pipeline.config import Params


@dataclass(frozen=True)
class Cursor:
    doc_id: str
    lang: str
    prefix: str
    suffix: str
    truth: str  # the real text after the cursor


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a binomial rate (sound at small n and at rates near 0 or 1).

    Written out because it is four lines; statsmodels would be a large dependency for one formula.
    """
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def accepts(completion: str, truth: str, min_common_prefix: int) -> bool:
    """The simulated user's rule: the completion matches what the user was about to type, far enough."""
    if not completion.strip():
        return False
    need = min(min_common_prefix, len(truth.split("\n", 1)[0].rstrip()) or min_common_prefix)
    return len(os.path.commonprefix([completion, truth])) >= need


def cursors(docs: list[dict], params: Params) -> list[Cursor]:
    """``gate.cursors_per_file`` cursors (line starts, after some context) in each of the first
    ``gate.heldout_files`` held-out files: the same cursors on every run and for both models.

    The line at the cursor is what the user is about to type: it is masked out of the suffix (as in
    single-line FIM evaluation), so the model cannot copy it from there.
    """
    cfg = params.rlhf.gate
    out = []
    for doc in docs[: cfg.heldout_files]:
        lines = doc["content"].split("\n")
        starts = [i for i in range(3, len(lines)) if len(lines[i].strip()) >= 8]
        rng = random.Random(f"{cfg.seed}:{doc['id']}")
        for i in sorted(rng.sample(starts, min(cfg.cursors_per_file, len(starts)))):
            prefix = "".join(line + "\n" for line in lines[:i])
            out.append(Cursor(doc["id"], doc["lang"], prefix, "\n" + "\n".join(lines[i + 1:]),
                              "\n".join(lines[i:])))
    return out


def replay(model_dir: str, params: Params, docs: list[dict]) -> dict:
    """Acceptance of ``model_dir`` on the held-out cursors: rate, counts and Wilson interval."""
    from pipeline.eval.fim import ContextFitter, fim_prompt
    from pipeline.eval.generate import GenerationSettings, generate, load_model

    sim = params.feedback.simulate
    cases = cursors(docs, params)
    if not cases:
        raise ValueError("no held-out files to replay (the validation split of data/dedup is empty)")
    model, tok = load_model(model_dir, params.train.num_threads)
    max_len = getattr(model.config, "max_position_embeddings", 2048)
    fitter = ContextFitter(tok, max_len, sim.max_tokens, params.eval.fim.max_context_chars)
    prompts = [fim_prompt(*fitter.fit(c.prefix, c.suffix, suffix_share=1 / 3)) for c in cases]
    settings = GenerationSettings(max_new_tokens=sim.max_tokens, temperature=0.0,
                                  batch_size=params.eval.fim.batch_size, seed=params.seed)
    outs = generate(model, tok, prompts, settings, desc="held-out replay")
    accepted = sum(accepts(o, c.truth, sim.min_common_prefix) for o, c in zip(outs, cases))
    lo, hi = wilson_interval(accepted, len(cases))
    return {"cursors": len(cases), "accepted": accepted, "rate": accepted / len(cases), "ci95": [lo, hi]}
