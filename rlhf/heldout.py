"""Held-out simulated acceptance: the simulated IDE user replayed on files the snapshot never saw.

``ownllm feedback simulate`` replays files of the validation split to fill the store, so the gate's
replay uses the *other* validation files: those the simulator did not pick
(``feedback.simulate.pick_files``) and that hold none of the snapshot's text (no bounty solution, no
accepted or rejected completion, no prompt tail appears in them). A tuned model cannot score by having
memorised the very contexts it was tuned on.

The cursors, the FIM request and the accept rule are the simulator's own (``feedback.simulate.cursors``
and ``accepts``), with the gate's seed, so the replay measures what the feedback measured. It stays one
greedy suggestion per cursor (not the simulator's ``choices`` sampled ones): the gate compares two models'
best guess, deterministically, without sampling noise. The
rate comes with its 95% Wilson interval (``feedback.analytics.wilson``): with a few dozen cursors the
interval is wide, and the loop report shows it rather than a bare point estimate.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import Params

PROBE_CHARS = 48  # a snapshot text this long found in a file means the snapshot saw that file


def snapshot_probes(snapshot_dir: str | Path) -> set[str]:
    """Distinctive pieces of every snapshot row: completions/solutions and the tail of each prompt."""
    from rlhf.tune import PAIRS_FILE, SFT_FILE, UNPAIRED_FILE

    probes: set[str] = set()
    for name in (SFT_FILE, PAIRS_FILE, UNPAIRED_FILE):
        p = Path(snapshot_dir) / name
        if not p.is_file():
            continue
        for line in p.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            prompt = row["prompt"].split("<fim_suffix>", 1)[0].removeprefix("<fim_prefix>")
            for text in (prompt[-PROBE_CHARS:], row.get("completion"), row.get("chosen"), row.get("rejected")):
                if text and len(text.strip()) >= 16:
                    probes.add(text.strip()[:PROBE_CHARS])
    return probes


def unseen_docs(docs: list[dict], params: Params) -> tuple[list[dict], dict[str, int]]:
    """Validation files neither the simulator nor the snapshot used, in canonical order; plus counts."""
    from feedback.simulate import pick_files

    simulated = {d["id"] for d in pick_files([dict(d) for d in docs], params.feedback.simulate)}
    probes = snapshot_probes(params.rlhf.snapshot_dir)
    out, seen = [], 0
    for d in docs:
        if d["id"] in simulated:
            continue
        if any(p in d["content"] for p in probes):
            seen += 1
            continue
        out.append(d)
    return out, {"val_files": len(docs), "simulated": len(simulated), "in_snapshot": seen, "replayed": 0}


def replay(model_dir: str, params: Params, docs: list[dict]) -> dict:
    """Acceptance of ``model_dir`` on held-out cursors: rate, counts and 95% Wilson interval."""
    from feedback.analytics import wilson
    from feedback.simulate import accepts, cursors
    from pipeline.fim_prompt import SPECIAL_TOKENS, FimPromptBuilder
    from pipeline.eval.generate import GenerationSettings, generate, load_model

    gate = params.rlhf.gate
    sim = params.feedback.simulate.model_copy(update={"seed": gate.seed, "cursors_per_file": gate.cursors_per_file})
    files, counts = unseen_docs(docs, params)
    files = [d for d in files if not any(t in d["content"] for t in SPECIAL_TOKENS)][: gate.heldout_files]
    cases = [c for d in files for c in cursors(d, sim)]
    if not cases:
        raise ValueError(f"no held-out files left to replay ({counts}): the validation split of "
                         f"{params.data.dedup.out} is used up by the simulator and the snapshot")
    model, tok = load_model(model_dir, params.train.num_threads)
    builder = FimPromptBuilder(tok, getattr(model.config, "max_position_embeddings", 2048))
    chars = sim.max_context_chars
    prompts = [builder.text(c.prefix[-chars:], c.suffix[:chars], sim.max_tokens) for c in cases]
    settings = GenerationSettings(max_new_tokens=sim.max_tokens, temperature=0.0,
                                  batch_size=params.eval.fim.batch_size, seed=params.seed)
    outs = generate(model, tok, prompts, settings, desc="held-out replay")
    accepted = sum(accepts(o, c.truth, sim.min_common_prefix) for o, c in zip(outs, cases))
    lo, hi = wilson(accepted, len(cases))
    counts["replayed"] = len(files)
    return {"cursors": len(cases), "accepted": accepted, "rate": accepted / len(cases), "ci95": [lo, hi],
            "files": counts}
