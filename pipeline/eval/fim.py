"""`ownllm eval fim`: what a completion product serves, measured on held-out code of every language.

For each held-out document (the validation split, shared with the shards and the simulated IDE user)
one cursor line is chosen deterministically from ``eval.fim.seed`` and the document id, then:

- **single-line infilling** (SantaCoder's FIM evaluation): the line is masked, the model sees prefix and
  suffix in PSM order and must produce the line;
- **next-line completion**: the model sees only the prefix and must produce the line.

Both are exact match after whitespace normalisation, reported per language and over all cases in
``reports/eval/<name>/fim.json`` (plus ``fim_results.jsonl``, one line per case).

Prompts come from the one FIM prompt builder (pipeline/fim_prompt.py), as in serving and tuning.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import Params
from pipeline.fim_prompt import SPECIAL_TOKENS, FimPromptBuilder


def validation_docs(params: Params, columns: tuple[str, ...] = ("id", "lang", "path", "content"),
                    part: str | None = None, gate_frac: float | None = None) -> list[dict]:
    """Documents of data/dedup in the validation split (``records.split_of``), in canonical (lang, id) order.

    ``part`` narrows them to one side of ``records.val_part_of`` with ``gate_frac`` (the caller passes
    ``rlhf.gate.heldout_frac``, a section of a layer above this one): ``"gate"``, the files only the RLHF gate
    sees, or ``"feedback"``, the files the simulated user replays."""
    from pipeline.data.records import read_docs, split_of, val_part_of

    if part not in (None, "gate", "feedback"):
        raise ValueError(f"part must be None, 'gate' or 'feedback', not {part!r}")
    if part is not None and gate_frac is None:
        raise ValueError("part needs gate_frac (rlhf.gate.heldout_frac)")
    table = read_docs(params.data.dedup.out, columns=list(dict.fromkeys(("id", "lang", *columns))))
    rows = [r for r in table.to_pylist() if split_of(r["id"], params.shards.val_frac) == "val"]
    if part is not None:
        rows = [r for r in rows if val_part_of(r["id"], gate_frac) == part]
    return sorted(rows, key=lambda r: (r["lang"], r["id"]))


def normalise(line: str) -> str:
    """A line as exact match compares it: whitespace runs collapsed (also the simulated user's rule)."""
    return " ".join(line.split())


@dataclass
class Case:
    """A masked line. The cursor sits at the end of the previous line, so the model writes "\n" + the line:
    a prompt ending in a bare newline is a token boundary BPE rarely produces (newlines merge with the
    indentation after them), and it would make the model stop or stumble at once."""

    doc_id: str
    lang: str
    line_no: int  # 0-based
    prefix: str  # text before the cursor line, without the newline that ends the previous line
    target: str  # the cursor line, without newlines
    suffix: str  # the text after the line, starting with its newline


def cursor_case(doc: dict, seed: int, min_line_chars: int) -> Case | None:
    """One deterministic cursor line per document: same seed and document, same line, on every machine."""
    lines = doc["content"].split("\n")
    # Line 0 has no previous line to put the cursor at.
    candidates = [i for i, line in enumerate(lines) if i > 0 and len(line.strip()) >= min_line_chars]
    if not candidates:
        return None
    i = random.Random(f"{seed}:{doc['id']}").choice(candidates)
    return Case(doc_id=doc["id"], lang=doc["lang"], line_no=i, prefix="\n".join(lines[:i]),
                target=lines[i], suffix="\n" + "\n".join(lines[i + 1:]))


def select_cases(docs: list[dict], seed: int, min_line_chars: int, max_docs: int) -> tuple[list[Case], Counter]:
    """Up to ``max_docs`` cases per language; documents that cannot give one are counted with the reason."""
    cases, skipped, per_lang = [], Counter(), Counter()
    for doc in docs:
        if per_lang[doc["lang"]] >= max_docs:
            continue
        if any(t in doc["content"] for t in SPECIAL_TOKENS):
            skipped["contains_special_token"] += 1  # would be read as control tokens in the prompt
            continue
        case = cursor_case(doc, seed, min_line_chars)
        if case is None:
            skipped["no_line_long_enough"] += 1
            continue
        cases.append(case)
        per_lang[doc["lang"]] += 1
    return cases, skipped


def generated_line(text: str) -> str | None:
    """The line the model wrote after the newline ending the previous line; None if it continued that line."""
    if not text.startswith("\n"):
        return None
    return text[1:].split("\n", 1)[0]


def exact(generated: str | None, target: str) -> bool:
    return generated is not None and normalise(generated) == normalise(target)


def evaluate_cases(model, tok, cases: list[Case], params: Params) -> list[dict]:
    from pipeline.eval.generate import GenerationSettings, generate

    cfg = params.eval.fim
    builder = FimPromptBuilder(tok, getattr(model.config, "max_position_embeddings", 2048))
    chars = cfg.max_context_chars  # a cheap cut first: tokenising whole files per case is wasted work
    infill_prompts = [builder.text(c.prefix[-chars:], c.suffix[:chars], cfg.max_new_tokens) for c in cases]
    next_prompts = [builder.text(c.prefix[-chars:], None, cfg.max_new_tokens) for c in cases]
    settings = GenerationSettings(max_new_tokens=cfg.max_new_tokens, temperature=0.0, batch_size=cfg.batch_size,
                                  seed=params.seed, stop=("\n",), leading="\n")
    infills = generate(model, tok, infill_prompts, settings, desc="fim infill")
    nexts = generate(model, tok, next_prompts, settings, desc="fim next-line")
    results = []
    for c, infill, nxt in zip(cases, infills, nexts):
        results.append({"doc_id": c.doc_id, "lang": c.lang, "line_no": c.line_no, "target": c.target,
                        "infill": infill, "next_line": nxt,  # as generated, cut at the end of the line
                        "infill_exact": exact(generated_line(infill), c.target),
                        "next_line_exact": exact(generated_line(nxt), c.target)})
    return results


def summarise(results: list[dict]) -> dict:
    per_lang: dict[str, dict] = defaultdict(lambda: {"cases": 0, "infill_exact": 0, "next_line_exact": 0})
    for r in results:
        s = per_lang[r["lang"]]
        s["cases"] += 1
        s["infill_exact"] += int(r["infill_exact"])
        s["next_line_exact"] += int(r["next_line_exact"])
    n = len(results)
    out = {"cases": n,
           "infill_exact": sum(r["infill_exact"] for r in results) / n if n else 0.0,
           "next_line_exact": sum(r["next_line_exact"] for r in results) / n if n else 0.0,
           "per_lang": {}}
    for lang, s in sorted(per_lang.items()):
        out["per_lang"][lang] = {"cases": s["cases"], "infill_exact": s["infill_exact"] / s["cases"],
                                 "next_line_exact": s["next_line_exact"] / s["cases"]}
    return out


def run_fim(params: Params, name: str, model_dir: str, docs: list[dict] | None = None) -> dict:
    from pipeline.eval.generate import load_model
    from pipeline.tracking import write_json, write_jsonl

    cfg = params.eval.fim
    docs = validation_docs(params) if docs is None else docs
    cases, skipped = select_cases(docs, cfg.seed, cfg.min_line_chars, cfg.max_docs)
    if not cases:
        raise ValueError(f"no held-out documents to evaluate in {params.data.dedup.out} "
                         f"(val_frac={params.shards.val_frac}, skipped: {dict(skipped) or 'none'})")
    model, tok = load_model(model_dir, params.eval.num_threads)
    results = evaluate_cases(model, tok, cases, params)
    summary = {**summarise(results), "docs_skipped": dict(sorted(skipped.items()))}
    out_dir = Path(params.eval.out) / name
    write_json(out_dir / "fim.json", summary)
    write_jsonl(out_dir / "fim_results.jsonl", results)
    return summary


def main(args) -> int:
    from pipeline.eval.cli import run_eval
    from pipeline.tracking import say

    name, summary = run_eval(args, "fim", run_fim)
    langs = ", ".join(f"{k} {v['infill_exact']:.2f}/{v['next_line_exact']:.2f} (n={v['cases']})"
                      for k, v in summary["per_lang"].items())
    say(f"[eval fim] {name}: infill exact {summary['infill_exact']:.3f}, next-line exact "
        f"{summary['next_line_exact']:.3f} over {summary['cases']} held-out cases; per language infill/next: {langs}")
    return 0
