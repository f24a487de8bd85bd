"""The `ownllm` console script.

Sub-command groups are discovered through the ``ownllm.commands`` entry points (see pyproject.toml), so
`pipeline` never imports `feedback` or `rlhf`. Each group module exposes ``register(subparsers)`` and
keeps heavy imports (torch, composer, spark) inside its handlers, so ``ownllm --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from importlib.metadata import entry_points
from typing import Callable

DEFAULT_PARAMS = "params.yaml"
# Commands that run a model: their floating point is pinned by params `numerics` before torch loads
# (pipeline/numerics.py). Matched against the leading words of the command line; `serve` stays native.
NUMERICS_COMMANDS = {("train",), ("export",), ("eval",), ("bisect",), ("rlhf", "sft"), ("rlhf", "preference"), ("rlhf", "dpo"),
                     ("rlhf", "gate"), ("rlhf", "round"), ("rlhf", "refresh"), ("feedback", "simulate"), ("repro", "probe")}


def add_params_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--params",
        default=DEFAULT_PARAMS,
        metavar="FILE",
        help="parameters file with the schema of params.yaml (default: %(default)s)",
    )


def lazy(target: str) -> Callable[[argparse.Namespace], int]:
    """A handler that imports ``module:function`` only when the command runs."""

    def handler(args: argparse.Namespace) -> int:
        module_name, func_name = target.split(":")
        return getattr(importlib.import_module(module_name), func_name)(args)

    handler.__qualname__ = target
    return handler


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ownllm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for ep in sorted(entry_points(group="ownllm.commands"), key=lambda e: e.name):
        try:
            register = ep.load()
        except ModuleNotFoundError as exc:  # a group whose package is not installed
            if exc.name and ep.value.startswith(exc.name):
                continue
            raise
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Nothing is ever fetched from a model or dataset hub at run time.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    args = build_parser().parse_args(argv)
    from pipeline.config import ParamsError

    try:
        pin_numerics(args, sys.argv[1:] if argv is None else list(argv), reexec=argv is None)
        return int(args.func(args) or 0)
    except ParamsError as exc:
        print(f"ownllm: {exc}", file=sys.stderr)
        return 2
    except UserError as exc:
        print(f"ownllm: error: {exc}", file=sys.stderr)
        return 2


def pin_numerics(args: argparse.Namespace, words: list[str], reexec: bool) -> None:
    """Set params `numerics` in the environment before the command imports torch (see pipeline/numerics.py).

    ``reexec``: this is the console script, so when torch is already loaded it re-executes itself with the
    variables set; an in-process caller (a test, a library user) gets a warning instead.
    """
    leading = tuple(w for w in words[:2] if not w.startswith("-"))
    if not any(leading[:len(c)] == c for c in NUMERICS_COMMANDS) or not getattr(args, "params", None):
        return
    from pipeline import numerics
    from pipeline.config import load_params

    try:
        numerics.pin_environment(load_params(args.params).numerics, words if reexec else None)
    except numerics.NumericsError as exc:
        raise UserError(str(exc)) from None


class UserError(Exception):
    """Bad input from the user (a missing file, a wrong argument): printed without a traceback."""


if __name__ == "__main__":
    # Under `python -m pipeline.cli` this file is `__main__`, a second copy of the module: the stages raise
    # `pipeline.cli.UserError`, which `main` here would not catch. Run the package module's `main` instead.
    from pipeline.cli import main as package_main

    sys.exit(package_main())
