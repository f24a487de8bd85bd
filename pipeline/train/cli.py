"""`ownllm train` and `ownllm export`."""

from __future__ import annotations

from pipeline.cli import add_params_arg, lazy


def register(sub) -> None:
    p = sub.add_parser("train", help="pretrain the base model with Composer (resumes automatically)")
    add_params_arg(p)
    p.add_argument("--skip-steps", nargs="+", metavar="START:END",
                   help="skip the batches of steps [START, END) (PaLM-style; overrides train.skip_steps)")
    p.add_argument("--load-path", metavar="CHECKPOINT",
                   help="restart from this Composer checkpoint (overrides train.load_path), e.g. before a spike")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="processes on this machine, through Composer's launcher (DDP; gloo on CPU)")
    p.set_defaults(func=lazy("pipeline.train.trainer:main"))

    p = sub.add_parser("export", help="write the trained model and tokenizer in Hugging Face format")
    add_params_arg(p)
    p.add_argument("--checkpoint", metavar="PATH",
                   help="export this Composer checkpoint instead of the final model of `ownllm train`")
    p.set_defaults(func=lazy("pipeline.train.export:main"))
