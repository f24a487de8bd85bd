"""`ownllm eval ...`: HumanEval, FIM / next-line accuracy, pluggable benchmarks and the regression gate."""

from __future__ import annotations

from pipeline.cli import add_params_arg, lazy


def run_eval(args, command: str, evaluate) -> tuple[str, dict]:
    """The shared body of the ``ownllm eval <command>`` entry points: params, report name, a tracked run, and
    bad input (a missing file, a malformed value) as a user error. ``evaluate(params, name, model_dir)``
    returns the summary; its per-item ``results``, if any, stay out of the tracked run's summary."""
    from pipeline.cli import UserError
    from pipeline.config import load_params
    from pipeline.tracking import stage_run

    from pipeline import numerics

    params = load_params(args.params)
    numerics.apply(params.numerics)  # eval.num_threads, when set, still wins for generation
    name = args.name or params.eval.name
    with stage_run(f"eval {command}", params, write_metrics=False) as run:
        try:
            summary = evaluate(params, name, args.model or params.eval.model)
        except (FileNotFoundError, ValueError) as exc:
            raise UserError(str(exc)) from None
        run.summary({k: v for k, v in summary.items() if k not in ("results", "report")})
    return name, summary


def _model_args(p) -> None:
    p.add_argument("--model", metavar="DIR", help="HF model directory (default: eval.model in params)")
    p.add_argument("--name", help="report name: writes reports/eval/<name>/ (default: eval.name in params)")


def register(sub) -> None:
    ev = sub.add_parser("eval", help="evaluate a model (HumanEval, FIM, benchmarks) and gate regressions")
    cmds = ev.add_subparsers(dest="eval_command", metavar="COMMAND", required=True)

    p = cmds.add_parser("humaneval", help="HumanEval pass@k, samples executed in the sandbox")
    add_params_arg(p)
    _model_args(p)
    p.add_argument("--samples", metavar="FILE", help="score this samples JSONL (task_id, completion) instead of generating; "
                   "the report goes beside FILE (FILE-stem.humaneval.json) unless --out says otherwise")
    p.add_argument("--out", metavar="DIR", help="write humaneval.json and humaneval_results.jsonl here "
                   "(default: eval.out/NAME/ for a model, beside FILE for --samples)")
    p.add_argument("--limit", type=int, metavar="N", help="first N problems only (default: eval.humaneval.limit)")
    p.set_defaults(func=lazy("pipeline.eval.humaneval:main"))

    p = cmds.add_parser("fim", help="single-line infilling and next-line exact match on held-out code")
    add_params_arg(p)
    _model_args(p)
    p.set_defaults(func=lazy("pipeline.eval.fim:main"))

    p = cmds.add_parser("idioms", help="greedy completions of common stdlib idioms: do they parse?")
    add_params_arg(p)
    _model_args(p)
    p.set_defaults(func=lazy("pipeline.eval.idioms:main"))

    p = cmds.add_parser("run", help="run a pluggable benchmark (problems JSONL + per-language runtimes)")
    add_params_arg(p)
    _model_args(p)
    p.add_argument("--benchmark", required=True, metavar="FILE", help="problems JSONL")
    p.add_argument("--runtimes", metavar="FILE", help="runtime specs (YAML/JSON) added to the built-in ones")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--samples", metavar="FILE", help="score this samples JSONL instead of generating")
    src.add_argument("--canonical", action="store_true", help="score the problems' canonical solutions (harness check)")
    p.set_defaults(func=lazy("pipeline.eval.benchmarks:main"))

    p = cmds.add_parser("compare", help="gate: fail when CANDIDATE regresses against BASE beyond tolerances")
    add_params_arg(p)
    p.add_argument("base", metavar="BASE", help="report directory (reports/eval/<name>/) or a name under eval.out")
    p.add_argument("candidate", metavar="CANDIDATE", help="report directory or name")
    p.set_defaults(func=lazy("pipeline.eval.compare:main"))
