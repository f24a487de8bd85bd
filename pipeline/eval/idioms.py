"""Greedy completions of common stdlib idioms, checked for syntactic plausibility.

HumanEval and exact-match infilling say nothing about a model too small to solve anything; this says
whether it has learned the shape of the language. Each prompt is a common Python idiom cut at a natural
token boundary (``import os\\nimport``, ``def __init__(self``, ``with open(path) as f:``). The model
continues it greedily; the completion is *plausible* when

- it finishes the line it started: the text up to the first newline after its first non-blank character
  (so ``with open(path) as f:`` is judged on the body line the model writes next), and
- the prompt plus that line parses as Python (``ast``), a trailing block opener (``...:``) getting an
  indented ``pass`` as its body, as the model's next line would give it.

So ``import os\\nimport`` → `` sys`` is plausible, `` import sys`` is not; ``for i in range(`` → ``10)`` is
not (no colon), ``len(items)):`` is. A model that loops on ``._._._`` or never ends a line fails.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from pipeline.config import Params


def completed_line(prompt: str, completion: str) -> str | None:
    """``prompt`` plus the completion up to the end of its first non-blank line; None if no such line ends."""
    first = re.search(r"\S", completion)
    if first is None:
        return None
    end = completion.find("\n", first.start())
    if end < 0:
        return None
    return prompt + completion[:end]


def parses(source: str) -> bool:
    """Whether ``source`` is valid Python, a trailing ``...:`` block opener given an indented body."""
    lines = source.rstrip().splitlines()
    if not lines:
        return False
    last = lines[-1]
    if last.rstrip().endswith(":"):
        indent = len(last) - len(last.lstrip())
        source = source.rstrip() + "\n" + " " * (indent + 4) + "pass\n"
    try:
        ast.parse(source)
    except (SyntaxError, ValueError):  # ValueError: a null byte in the source
        return False
    return True


def plausible(prompt: str, completion: str) -> bool:
    line = completed_line(prompt, completion)
    return line is not None and parses(line)


def run_idioms(params: Params, name: str, model_dir: str) -> dict:
    from pipeline.eval.generate import GenerationSettings, generate, load_model
    from pipeline.hashing import weights_hash
    from pipeline.tracking import write_json, write_jsonl

    cfg = params.eval.idioms
    model, tok = load_model(model_dir, params.eval.num_threads)
    settings = GenerationSettings(max_new_tokens=cfg.max_new_tokens, temperature=0.0, batch_size=len(cfg.prompts))
    completions = generate(model, tok, cfg.prompts, settings, desc="idioms")
    results = []
    for prompt, completion in zip(cfg.prompts, completions):
        line = completed_line(prompt, completion)
        results.append({"prompt": prompt, "completion": completion,
                        "judged_line": None if line is None else line.splitlines()[-1],
                        "plausible": line is not None and parses(line)})
    n_ok = sum(r["plausible"] for r in results)
    summary = {"prompts": len(results), "plausible": n_ok, "plausible_rate": n_ok / len(results),
               "max_new_tokens": cfg.max_new_tokens, "model_sha256": weights_hash(model_dir)}
    out_dir = Path(params.eval.out) / name
    write_json(out_dir / "idioms.json", summary)
    write_jsonl(out_dir / "idioms_results.jsonl", results)
    return {**summary, "results": results}


def main(args) -> int:
    from pipeline.eval.cli import run_eval
    from pipeline.tracking import say

    name, summary = run_eval(args, "idioms", run_idioms)
    say(f"[eval idioms] {name}: {summary['plausible']}/{summary['prompts']} greedy completions of stdlib idioms "
        "are syntactically plausible")
    for r in summary["results"]:
        say(f"  {'ok ' if r['plausible'] else 'bad'} {r['prompt']!r} -> {r['completion'][:60]!r}")
    return 0
