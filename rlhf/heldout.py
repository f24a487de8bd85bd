"""The held-out replay: the simulated IDE user on files no feedback, snapshot or tuning step has seen.

Files: the 'gate' part of the validation split (``pipeline.data.records.val_part_of`` with
``rlhf.gate.heldout_frac``, a hash of the document id). ``ownllm feedback simulate`` — and so every
bounty, snapshot row and tuning example — draws from the other part only, so a tuned model cannot score
by having memorised the contexts it was tuned on; the split is fixed by params, not by what a snapshot
happens to contain.

Cursors, the real continuation (``kept``) and the accept rule are the simulator's own
(``feedback.simulate.cursors`` with the gate's seed, ``is_accepted`` with partial accept at word
boundaries), ``rlhf.gate.cursors_per_file`` per file. Each model gives one greedy suggestion per cursor,
cut at the end of the line, so the comparison has no sampling noise and every cursor is scored for both
models: the comparison is paired (``pipeline.eval.paired``).

Per cursor (``heldout_results.jsonl``): the suggestion, its mean token log-probability, whether it was
shown (non-empty, and above the suggestion filter's threshold when one is given), accepted characters,
and the utility ``accepted_chars - reject_cost_chars * (shown and not accepted)``. The summary
(``heldout.json``): shown rate, acceptance (of shown suggestions, and per cursor), accepted characters per
cursor, the share of the real continuation's characters that came from accepted suggestions, utility per
cursor.
"""

from __future__ import annotations

import json
from pathlib import Path

from rlhf.config import RLHFParams

RESULTS_FILE = "heldout_results.jsonl"
SUMMARY_FILE = "heldout.json"


def gate_docs(params: RLHFParams) -> list[dict]:
    """The gate's held-out files (the 'gate' part of the validation split), canonical order."""
    from pipeline.eval.fim import validation_docs

    return validation_docs(params, part="gate", gate_frac=params.rlhf.gate.heldout_frac)


def gate_cursors(docs: list[dict], params: RLHFParams):
    """The replay's cursors: the simulator's cursor rule with the gate's seed and cursor count."""
    from feedback.simulate import cursors
    from pipeline.fim_prompt import SPECIAL_TOKENS

    gate = params.rlhf.gate
    sim = params.feedback.simulate.model_copy(update={"seed": gate.seed})
    files = [d for d in docs if not any(t in d["content"] for t in SPECIAL_TOKENS)]
    if gate.max_files is not None:
        files = files[: gate.max_files]
    return [c for d in files for c in cursors(d, sim, per_file=gate.cursors_per_file)]


def suggest(model_dir: str | Path, params: RLHFParams, cases) -> tuple[list[str], list[float]]:
    """One greedy suggestion per cursor (cut at the end of its line) and its mean token log-probability."""
    from pipeline.eval.generate import GenerationSettings, generate, load_model
    from pipeline.fim_prompt import FimPromptBuilder

    gate = params.rlhf.gate
    model, tok = load_model(model_dir, params.eval.num_threads)
    builder = FimPromptBuilder(tok, getattr(model.config, "max_position_embeddings", 2048))
    chars = params.feedback.simulate.max_context_chars
    prompts = [builder.text(c.prefix[-chars:], c.suffix[:chars], gate.max_tokens) for c in cases]
    settings = GenerationSettings(max_new_tokens=gate.max_tokens, temperature=0.0, batch_size=gate.batch_size,
                                  seed=params.seed, stop=("\n",))
    logprobs: list[float] = []
    outs = generate(model, tok, prompts, settings, desc=f"held-out replay {Path(model_dir).name}", logprobs=logprobs)
    return outs, logprobs


def score(cases, suggestions: list[str], logprobs: list[float], params: RLHFParams, show=None) -> list[dict]:
    """Per-cursor outcome rows. ``show``: optional callable(row) -> bool, the suggestion filter."""
    from feedback.simulate import is_accepted
    from feedback.suggestion_filter import filter_input

    cost = params.rlhf.gate.reject_cost_chars
    min_words = params.feedback.simulate.min_accept_words
    rows = []
    for c, text, lp in zip(cases, suggestions, logprobs):
        # The suggestion filter's input comes from the same builder as the gateway's (prefix tail, suggestion,
        # mean token log-probability, language).
        f = filter_input(c.prefix, text, lp, c.lang)
        row = {"key": c.key, "file": c.doc_id, "lang": f["lang"], "line_no": c.line_no, "col": c.col,
               "prefix_tail": f["prefix_tail"], "kept": c.kept, "suggestion": f["suggestion"], "logprob": f["logprob"]}
        shown = bool(text.strip()) and (show is None or bool(show(row)))
        acc = is_accepted(text, c.kept, min_words) if shown else 0
        row.update(shown=shown, accepted=acc > 0, accepted_chars=acc,
                   utility=acc - (cost if shown and not acc else 0.0))
        rows.append(row)
    return rows


def summarise(rows: list[dict]) -> dict:
    from feedback.analytics import wilson

    n = len(rows)
    shown = sum(r["shown"] for r in rows)
    acc = sum(r["accepted"] for r in rows)
    lo, hi = wilson(acc, shown) if shown else (0.0, 1.0)
    kept = sum(len(r["kept"]) for r in rows)
    return {"cursors": n, "files": len({r["file"] for r in rows}), "shown": shown, "accepted": acc,
            "shown_rate": shown / n if n else 0.0,
            "acceptance": acc / shown if shown else 0.0, "acceptance_ci95": [lo, hi],
            "accepted_per_cursor": acc / n if n else 0.0,
            "accepted_chars_per_cursor": sum(r["accepted_chars"] for r in rows) / n if n else 0.0,
            "completed_share": sum(r["accepted_chars"] for r in rows) / kept if kept else 0.0,
            "utility_per_cursor": sum(r["utility"] for r in rows) / n if n else 0.0}


def replay(model_dir: str | Path, params: RLHFParams, docs: list[dict], out_dir: str | Path | None = None,
           show=None) -> dict:
    """Replay the held-out cursors on ``model_dir``; write ``heldout.json`` + ``heldout_results.jsonl``
    to ``out_dir`` when given. Returns the summary with the rows under ``"rows"``."""
    cases = gate_cursors(docs, params)
    if not cases:
        raise ValueError(f"no held-out cursors to replay: the gate part of the validation split of "
                         f"{params.data.dedup.out} (rlhf.gate.heldout_frac={params.rlhf.gate.heldout_frac}) "
                         f"has no usable lines")
    texts, logprobs = suggest(model_dir, params, cases)
    return _scored(cases, texts, logprobs, params, show, out_dir)


def rescore(report_dir: str | Path, params: RLHFParams, docs: list[dict], out_dir: str | Path | None = None,
            show=None) -> dict:
    """The replay written to ``report_dir`` scored again, e.g. with a suggestion filter ``show``: the same model's
    greedy suggestions and log-probabilities, so the deployed version (model + filter) costs no second decoding.
    Written and returned as ``replay`` does."""
    cases = gate_cursors(docs, params)
    done = {r["key"]: r for r in read_rows(report_dir)}
    missing = [c.key for c in cases if c.key not in done]
    if missing or len(done) != len(cases):
        raise ValueError(f"the replay in {report_dir} scored other cursors than the gate's ({len(done)} rows, "
                         f"{len(missing)} of {len(cases)} cursors missing): rerun the gate")
    texts = [done[c.key]["suggestion"] for c in cases]
    logprobs = [done[c.key]["logprob"] for c in cases]
    return _scored(cases, texts, logprobs, params, show, out_dir)


def _scored(cases, texts: list[str], logprobs: list[float], params: RLHFParams, show, out_dir) -> dict:
    from pipeline.tracking import write_json, write_jsonl

    rows = score(cases, texts, logprobs, params, show)
    summary = summarise(rows)
    if out_dir is not None:
        write_json(Path(out_dir) / SUMMARY_FILE, summary)
        write_jsonl(Path(out_dir) / RESULTS_FILE, rows)
    return {**summary, "rows": rows}


def read_rows(report_dir: str | Path) -> list[dict]:
    p = Path(report_dir) / RESULTS_FILE
    if not p.is_file():
        raise FileNotFoundError(f"no held-out replay results at {p} (run `ownllm rlhf gate`)")
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
