"""`ownllm eval run --benchmark FILE`: any-language execution benchmarks through the same sandbox.

A benchmark is data, not code:

- a **problems JSONL**, one problem a line: ``task_id``, ``language``, ``prompt`` (what the model
  continues), ``tests`` (code that exits non-zero when the solution is wrong), optionally
  ``canonical_solution`` and ``entry_point``;
- a **runtime spec** per language: the file to write, the command that runs it, and the harness
  template that joins prompt, completion and tests into that file. Python and JavaScript (Node) are
  built in; ``--runtimes FILE`` (YAML or JSON, ``{language: spec}``) adds or overrides languages.

Every program runs under :mod:`pipeline.eval.sandbox`; pass@k is reported overall and per language in
``reports/eval/<name>/<benchmark>.json`` (+ ``<benchmark>_results.jsonl``).
"""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from pipeline.config import Params
from pipeline.eval.passk import mean_pass_at_k
from pipeline.eval.sandbox import PYTHON_NO_NETWORK, Job, Sandbox, python_argv, sandbox_from_config

PLACEHOLDER = re.compile(r"\{(prompt|completion|tests|entry_point)\}")
REQUIRED_FIELDS = ("task_id", "language", "prompt", "tests")


@dataclass(frozen=True)
class Runtime:
    """How to run one language: ``command`` may name ``{file}``; ``template`` joins the program."""

    file: str
    command: tuple[str, ...]
    template: str = "{prompt}{completion}\n\n{tests}\n"
    stop: tuple[str, ...] = ()
    memory_mb: int | None = None  # address space, when the language's VM needs more than the default

    def argv(self) -> list[str]:
        return [part.replace("{file}", self.file) for part in self.command]

    def available(self) -> bool:
        return shutil.which(self.command[0]) is not None


def builtin_runtimes() -> dict[str, Runtime]:
    return {
        "python": Runtime(file="main.py", command=tuple(python_argv("{file}")),
                          template="{prompt}{completion}\n\n{tests}\n",
                          stop=("\ndef", "\nclass", "\nif", "\nprint", "\n#")),
        # MultiPL-E's JavaScript stop sequences: the model writes the closing brace itself.
        "javascript": Runtime(file="main.js", command=("node", "{file}"), template="{prompt}{completion}\n\n{tests}\n",
                              stop=("\nfunction ", "\n/*", "\n//", "\nconsole.log"), memory_mb=4096),
    }


def load_runtimes(path: str | None) -> dict[str, Runtime]:
    runtimes = builtin_runtimes()
    if not path:
        return runtimes
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"runtimes file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))  # YAML is a superset of JSON
    except yaml.YAMLError as exc:
        raise ValueError(f"cannot parse runtimes file {p}: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"runtimes file {p}: expected a mapping of language -> spec")
    for lang, spec in data.items():
        try:
            command = spec["command"]
            runtimes[lang] = Runtime(file=spec["file"], command=tuple([command] if isinstance(command, str) else command),
                                     template=spec.get("template", Runtime.template), stop=tuple(spec.get("stop", ())),
                                     memory_mb=spec.get("memory_mb"))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"runtimes file {p}: language {lang!r} needs 'file' and 'command' ({exc})") from None
    return runtimes


def build_program(runtime: Runtime, problem: dict, completion: str) -> str:
    """Fill the harness template in one pass, so braces or placeholders inside code are never re-expanded."""
    fields = {"prompt": problem["prompt"], "completion": completion, "tests": problem["tests"],
              "entry_point": problem.get("entry_point", "")}
    return PLACEHOLDER.sub(lambda m: fields[m.group(1)], runtime.template)


@dataclass
class Benchmark:
    name: str
    problems: list[dict] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)


def load_benchmark(path: str | Path, runtimes: dict[str, Runtime]) -> Benchmark:
    """Problems that can run here; the others are skipped and counted with the reason."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"benchmark file not found: {p}")
    bench = Benchmark(name=p.name.split(".")[0])
    seen = set()
    for line in p.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            bench.skipped["invalid_json"] += 1
            continue
        if not isinstance(rec, dict) or any(not isinstance(rec.get(k), str) for k in REQUIRED_FIELDS):
            bench.skipped["missing_fields"] += 1
        elif rec["task_id"] in seen:
            bench.skipped["duplicate_task_id"] += 1
        elif rec["language"] not in runtimes:
            bench.skipped[f"no_runtime:{rec['language']}"] += 1
        elif not runtimes[rec["language"]].available():
            bench.skipped[f"runtime_unavailable:{runtimes[rec['language']].command[0]}"] += 1
        else:
            seen.add(rec["task_id"])
            bench.problems.append(rec)
    if not bench.problems:
        raise ValueError(f"benchmark {p} has no runnable problems (skipped: {dict(bench.skipped) or 'none'})")
    return bench


def job_for(runtime: Runtime, problem: dict, completion: str, sandbox: Sandbox) -> Job:
    program = build_program(runtime, problem, completion)
    if runtime.file.endswith(".py") and not sandbox.isolation.network_blocked:
        program = PYTHON_NO_NETWORK + program
    limits = replace(sandbox.limits, memory_mb=max(sandbox.limits.memory_mb, runtime.memory_mb or 0))
    return Job(files={runtime.file: program}, argv=runtime.argv(), limits=limits)


def score_benchmark(bench: Benchmark, samples: list[dict], runtimes: dict[str, Runtime], sandbox: Sandbox,
                    ks) -> tuple[dict, list[dict]]:
    by_id = {p["task_id"]: p for p in bench.problems}
    jobs = [job_for(runtimes[by_id[s["task_id"]]["language"]], by_id[s["task_id"]], s["completion"], sandbox)
            for s in samples]
    executions = sandbox.map(jobs, desc=f"{bench.name} exec")
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    results = []
    for s, ex in zip(samples, executions):
        counts[s["task_id"]][0] += 1
        counts[s["task_id"]][1] += int(ex.passed)
        results.append({"task_id": s["task_id"], "language": by_id[s["task_id"]]["language"], "passed": ex.passed,
                        "status": ex.status, "stderr_tail": ex.stderr[-300:]})
    per_lang: dict[str, list] = defaultdict(list)
    for p in bench.problems:
        if p["task_id"] in counts:
            per_lang[p["language"]].append(tuple(counts[p["task_id"]]))
    all_counts = [c for lang in sorted(per_lang) for c in per_lang[lang]]
    summary = {"benchmark": bench.name, **mean_pass_at_k(all_counts, ks), "problems": len(all_counts),
               "samples": len(samples), "skipped_problems": dict(sorted(bench.skipped.items())),
               "per_language": {lang: {**mean_pass_at_k(c, ks), "problems": len(c)} for lang, c in sorted(per_lang.items())}}
    return summary, results


def read_completions(path: str | Path, known: set[str]) -> tuple[list[dict], Counter]:
    from pipeline.eval.humaneval import read_samples

    read = read_samples(path, known)
    return read.samples, read.skipped


def generate_completions(params: Params, bench: Benchmark, runtimes: dict[str, Runtime], model_dir: str) -> list[dict]:
    """Sampling settings are HumanEval's (n, temperature, top_p, max_new_tokens); stops are the runtime's."""
    from pipeline.eval.generate import GenerationSettings, generate, load_model

    cfg = params.eval.humaneval
    model, tok = load_model(model_dir, params.eval.num_threads)
    samples = []
    for lang in sorted({p["language"] for p in bench.problems}):
        probs = [p for p in bench.problems if p["language"] == lang]
        settings = GenerationSettings(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                                      batch_size=cfg.batch_size, seed=params.seed, stop=runtimes[lang].stop)
        prompts = [p["prompt"] for p in probs for _ in range(cfg.n_samples)]
        outs = generate(model, tok, prompts, settings, desc=f"{bench.name} gen {lang}")
        samples += [{"task_id": p["task_id"], "completion": c}
                    for p, c in zip([p for p in probs for _ in range(cfg.n_samples)], outs)]
    return samples


def run_benchmark(params: Params, name: str, model_dir: str, benchmark: str, runtimes_file: str | None = None,
                  samples_path: str | None = None, canonical: bool = False) -> dict:
    from pipeline.tracking import write_json, write_jsonl

    runtimes = load_runtimes(runtimes_file)
    bench = load_benchmark(benchmark, runtimes)
    out_dir = Path(params.eval.out) / name
    report, per_item = out_dir / f"{bench.name}.json", out_dir / f"{bench.name}_results.jsonl"
    if samples_path or canonical:  # outside completions: never over a stage's DVC-tracked report
        from pipeline.dvc_outputs import refuse_tracked_outputs

        refuse_tracked_outputs([report, per_item], why="choose another --name")
    skipped: Counter = Counter()
    if canonical:
        samples = [{"task_id": p["task_id"], "completion": p["canonical_solution"]} for p in bench.problems
                   if isinstance(p.get("canonical_solution"), str)]
        if not samples:
            raise ValueError(f"benchmark {benchmark} has no canonical_solution fields")
    elif samples_path:
        samples, skipped = read_completions(samples_path, {p["task_id"] for p in bench.problems})
        if not samples:
            raise ValueError(f"no usable samples in {samples_path} (skipped: {dict(skipped) or 'none'})")
    else:
        samples = generate_completions(params, bench, runtimes, model_dir)
    sampled = {s["task_id"] for s in samples}
    bench.problems = [p for p in bench.problems if p["task_id"] in sampled]
    summary, results = score_benchmark(bench, samples, runtimes, sandbox_from_config(params.eval.sandbox),
                                       params.eval.humaneval.k)
    summary["skipped_samples"] = dict(sorted(skipped.items()))
    write_json(report, summary)
    write_jsonl(per_item, results)
    return summary


def main(args) -> int:
    from pipeline.eval.cli import run_eval
    from pipeline.tracking import say

    name, summary = run_eval(args, "run", lambda params, name, model: run_benchmark(
        params, name, model, args.benchmark, args.runtimes, args.samples, args.canonical))
    langs = ", ".join(f"{lang} {v.get('pass@1', 0):.2f} (n={v['problems']})" for lang, v in summary["per_language"].items())
    say(f"[eval run] {summary['benchmark']} for {name}: pass@1 {summary.get('pass@1', 0):.3f} over "
        f"{summary['problems']} problems; per language: {langs}; skipped {summary['skipped_problems'] or 'none'}")
    return 0
