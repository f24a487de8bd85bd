"""`ownllm repro probe` and `ownllm repro check`."""

from __future__ import annotations

from pipeline.cli import add_params_arg, lazy


def register(sub) -> None:
    rp = sub.add_parser("repro", help="reproducibility: probe this machine's numerics, check a rebuild against dvc.lock")
    cmds = rp.add_subparsers(dest="repro_command", metavar="COMMAND", required=True)

    p = cmds.add_parser("probe", help="a few AdamW steps of a tiny Llama under params `numerics`: weights hash + fingerprint (JSON)")
    add_params_arg(p)
    p.add_argument("--steps", type=int, default=30, metavar="N", help="optimizer steps (default: %(default)s)")
    p.set_defaults(func=lazy("pipeline.repro.probe:main"))

    p = cmds.add_parser("check", help="this workspace against the committed dvc.lock, per stage: identical, determinism "
                                      "bug, or numerics differ (metrics within repro.tolerances)")
    add_params_arg(p)
    p.add_argument("--rev", metavar="REV", help="git revision of the reference dvc.lock (default: repro.lock_rev)")
    p.add_argument("--root", default=".", metavar="DIR", help="the workspace (default: the current directory)")
    p.add_argument("--json", action="store_true", help="print the verdicts as JSON")
    p.set_defaults(func=lazy("pipeline.repro.check:main"))
