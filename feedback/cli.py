"""`ownllm serve`, `ownllm feedback ...` and `ownllm models ...` (the registry and rollout)."""

from __future__ import annotations

from pipeline.cli import add_params_arg, lazy


def _db_arg(p) -> None:
    p.add_argument("--db-url", metavar="URL", help="feedback store (default: serve.db_url in params)")


def register(sub) -> None:
    p = sub.add_parser("serve", help="the OpenAI-compatible completion gateway (logs every completion)")
    add_params_arg(p)
    _db_arg(p)
    p.add_argument("--host", help="default: serve.host")
    p.add_argument("--port", type=int, help="default: serve.port")
    p.add_argument("--backend", choices=["local", "openai"], help="default: serve.backend")
    p.add_argument("--model-dir", help="registered as a version when the registry is empty (default: serve.model_dir)")
    p.add_argument("--upstream-url", help="OpenAI-compatible base URL for --backend openai, e.g. http://vllm:8000/v1")
    p.add_argument("--num-threads", type=int, help="torch threads of the transformers backend (default: serve.num_threads)")
    p.add_argument("--engine-threads", type=int, help="CTranslate2 threads per model version (default: serve.engine_threads)")
    p.add_argument("--workers", type=int, help="server processes, each with its own app and engine (default: 1)")
    p.add_argument("--engine", choices=["ctranslate2", "transformers"], help="in-process engine (default: serve.engine)")
    p.add_argument("--quantization", choices=["float32", "int8"], help="CTranslate2 compute type (default: serve.quantization)")
    p.set_defaults(func=lazy("feedback.commands:serve"))

    fb = sub.add_parser("feedback", help="the feedback store: keys, bounties, reports, simulated users, retention")
    cmds = fb.add_subparsers(dest="feedback_command", metavar="COMMAND", required=True)

    p = cmds.add_parser("migrate", help="bring the store's schema to the head revision (alembic upgrade)")
    add_params_arg(p)
    _db_arg(p)
    p.add_argument("--revision", default="head", help="target revision (default: head)")
    p.add_argument("--down", action="store_true", help="downgrade to --revision instead (e.g. --down --revision base)")
    p.set_defaults(func=lazy("feedback.commands:migrate"))

    p = cmds.add_parser("create-key", help="create an API key for a user (printed once, stored hashed)")
    add_params_arg(p)
    _db_arg(p)
    p.add_argument("--user", required=True, metavar="NAME")
    p.add_argument("--staff", action="store_true", help="staff users get `staff` model versions first")
    p.add_argument("--store-code", choices=["yes", "no"],
                   help="no: keep counts, ids and hashes of this user's completions but no code text (like "
                        "Continue's noCode level); default: unchanged (new users: yes)")
    p.set_defaults(func=lazy("feedback.commands:create_key"))

    p = cmds.add_parser("import-bounties", help="add bounties from a JSONL file (title, instruction, language, solution)")
    add_params_arg(p)
    _db_arg(p)
    p.add_argument("file", metavar="FILE.jsonl")
    p.add_argument("--source", default="import", help="source recorded on each bounty (default: %(default)s)")
    p.set_defaults(func=lazy("feedback.commands:import_bounties"))

    p = cmds.add_parser("report", help="acceptance per model version x language with 95%% intervals; A/B verdict")
    add_params_arg(p)
    _db_arg(p)
    p.add_argument("--days", type=float, help="window: the last N days (default: feedback.report_days)")
    p.add_argument("--since", help="window start, ISO date/time (UTC); overrides --days")
    p.add_argument("--until", help="window end, ISO date/time (UTC); default: now")
    p.add_argument("--out", help="directory for acceptance.json and acceptance.png (default: feedback.reports_dir)")
    p.set_defaults(func=lazy("feedback.commands:report"))

    p = cmds.add_parser("simulate", help="replay held-out files through the API as IDE users; fill the store")
    add_params_arg(p)
    _db_arg(p)
    p.add_argument("--round", type=int, default=0, metavar="R",
                   help="refresh round: fresh cursors, disjoint from earlier rounds; feedback accumulates (default 0)")
    p.set_defaults(func=lazy("feedback.simulate:main"))

    p = cmds.add_parser("purge", help="clear completion texts older than N days (rows and counts are kept)")
    add_params_arg(p)
    _db_arg(p)
    p.add_argument("--days", type=int, help="default: serve.retention_days")
    p.set_defaults(func=lazy("feedback.commands:purge"))

    mo = sub.add_parser("models", help="the model registry: list, register, promote, retire")
    cmds = mo.add_subparsers(dest="models_command", metavar="COMMAND", required=True)

    p = cmds.add_parser("list", help="versions with lineage and rollout state")
    add_params_arg(p)
    _db_arg(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=lazy("feedback.commands:models_list"))

    p = cmds.add_parser("register", help="add a model directory to the registry (rollout state staff by default)")
    add_params_arg(p)
    _db_arg(p)
    p.add_argument("model_dir", metavar="DIR")
    p.add_argument("--name", required=True)
    p.add_argument("--parent", help="the version it was tuned from")
    p.add_argument("--snapshot-hash", help="hash of the feedback snapshot it was tuned on")
    p.add_argument("--eval-report", help="JSON file with its evaluation results")
    p.add_argument("--state", default="staff", help="initial rollout target: staff, ab:PCT, all (default: staff)")
    p.add_argument("--filter", metavar="FILE", help="its suggestion filter (filter.json from `ownllm rlhf gate`); "
                   "refused unless fitted for these weights")
    p.set_defaults(func=lazy("feedback.commands:models_register"))

    p = cmds.add_parser("promote", help="move a version to staff | ab:PCT | all")
    add_params_arg(p)
    _db_arg(p)
    p.add_argument("version", metavar="VERSION")
    p.add_argument("--to", required=True, metavar="TARGET", help="staff, ab:PCT (e.g. ab:20) or all")
    p.set_defaults(func=lazy("feedback.commands:models_promote"))

    p = cmds.add_parser("retire", help="stop serving a version")
    add_params_arg(p)
    _db_arg(p)
    p.add_argument("version", metavar="VERSION")
    p.set_defaults(func=lazy("feedback.commands:models_retire"))
