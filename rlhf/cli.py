"""`ownllm rlhf snapshot|sft|preference|gate|register|round|loop|refresh` and `ownllm lineage VERSION`."""

from __future__ import annotations

from pipeline.cli import add_params_arg, lazy


def _db_arg(p) -> None:
    p.add_argument("--db-url", metavar="URL", help="feedback store (default: serve.db_url in params)")


def register(sub) -> None:
    rl = sub.add_parser("rlhf", help="tune the model on user feedback: snapshot, SFT, DPO/KTO, gate, register")
    cmds = rl.add_subparsers(dest="rlhf_command", metavar="COMMAND", required=True)

    p = cmds.add_parser("snapshot", help="feedback store → data/feedback/ (SFT, preference pairs, unpaired)")
    add_params_arg(p)
    _db_arg(p)
    p.add_argument("--parent", choices=["base", "production"],
                   help="the model tuning starts from: base (rlhf.base_model, `dvc repro`) or production (the version "
                        "serving everyone, `ownllm rlhf refresh`); default: $OWNLLM_RLHF_PARENT, else base")
    p.set_defaults(func=lazy("rlhf.commands:snapshot"))

    p = cmds.add_parser("sft", help="SFT the production model on the snapshot's bounties (TRL) → models/sft/")
    add_params_arg(p)
    p.set_defaults(func=lazy("rlhf.commands:sft"))

    p = cmds.add_parser("preference", aliases=["dpo"],
                        help="preference tuning (TRL): DPO on accepted vs rejected completions, KTO when pairs are "
                             "few, a copy of the SFT model when there is no preference → models/tuned/")
    add_params_arg(p)
    p.set_defaults(func=lazy("rlhf.commands:dpo"))

    p = cmds.add_parser("gate", help="evaluate tuned vs parent; write reports/rlhf_gate.json and reports/loop.json")
    add_params_arg(p)
    p.set_defaults(func=lazy("rlhf.commands:gate"))

    p = cmds.add_parser("register", help="register models/tuned as a staff version if the gate passed")
    add_params_arg(p)
    _db_arg(p)
    p.add_argument("--on-fail", choices=["exit", "record"], default="exit",
                   help="failed gate: exit 1 (default) or only record it (the DVC stage, so `dvc repro` completes)")
    p.set_defaults(func=lazy("rlhf.commands:register"))

    p = cmds.add_parser("round", help="a later refresh round of `dvc repro` (stage refresh@round-N): simulate "
                                      "round N-1's traffic, then snapshot ... register from the version round N-1 "
                                      "deployed → <rlhf.loop.dir>/round-N/")
    add_params_arg(p)
    _db_arg(p)
    p.add_argument("round", metavar="ROUND", help="round-N (N >= 2), one of rlhf.loop.rounds")
    p.set_defaults(func=lazy("rlhf.commands:loop_round"))

    p = cmds.add_parser("loop", help="reports/loop.json + loop.png: every round's gate metrics with their 95%% CIs")
    add_params_arg(p)
    p.set_defaults(func=lazy("rlhf.commands:loop"))

    p = cmds.add_parser("refresh", help="the periodic job: snapshot → sft → preference → gate → register, if there is new feedback")
    add_params_arg(p)
    _db_arg(p)
    p.add_argument("--runner", choices=["dvc", "direct"], help="default: rlhf.refresh_runner in params")
    p.set_defaults(func=lazy("rlhf.commands:refresh"))

    p = sub.add_parser("lineage", help="what reproduces a model version: git rev, dvc.lock hash, commands")
    add_params_arg(p)
    _db_arg(p)
    p.add_argument("version", metavar="VERSION")
    p.add_argument("--check", metavar="DIR", help="exit 1 unless DIR holds exactly this version's weights")
    p.set_defaults(func=lazy("rlhf.commands:lineage"))
