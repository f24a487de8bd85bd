"""`ownllm tokenizer ...`: train the project's BPE tokenizer."""

from __future__ import annotations

from pipeline.cli import add_params_arg, lazy


def register(sub) -> None:
    tok = sub.add_parser("tokenizer", help="the project's BPE tokenizer").add_subparsers(
        dest="tokenizer_command", metavar="COMMAND", required=True)
    p = tok.add_parser("train", help="train byte-level BPE on a seeded subsample of data/dedup/")
    add_params_arg(p)
    p.set_defaults(func=lazy("pipeline.tokenizer.train:main"))
