"""`ownllm rlhf sft` and `ownllm rlhf dpo`: TRL on the feedback snapshot.

SFT teaches the parent model the accepted bounty solutions (TRL ``SFTTrainer``, prompt/completion format,
loss on the completion only). Then preference tuning on what users accepted vs rejected: ``DPOTrainer``
on prompt/chosen/rejected pairs, or ``KTOTrainer`` on unpaired prompt/completion/label examples when
params say so or when there are fewer than ``rlhf.min_pairs`` pairs. The losses are TRL's; this module
only feeds TRL its documented formats and a config built from params.yaml.

Determinism: every run seeds torch/numpy/python from ``params.seed`` (TrainingArguments ``seed`` and
``data_seed``), reads the snapshot in its stable order, trains on CPU in fp32 by default, and saves with
safetensors, so the same snapshot + the same params give byte-identical weights (tests check it).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf.config import RLHFConfig, RLHFParams

SFT_FILE = "sft.jsonl"
PAIRS_FILE = "pairs.jsonl"
UNPAIRED_FILE = "unpaired.jsonl"
PARENT_FILE = "parent.json"


class TuneError(RuntimeError):
    """A tuning input that is missing or unusable (named in the message)."""


@dataclass
class TuneResult:
    method: str  # "sft" | "dpo" | "kto" | "copy" (nothing to train on: the parent is passed through) | "none"
    examples: int
    steps: int
    train_loss: float | None
    tokens: int
    seconds: float
    out_dir: Path
    skipped: str | None = None  # why the stage did not train (params switched it off), in its report

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def metrics(self) -> dict[str, Any]:
        """Deterministic values only (the DVC metrics file); timings go to W&B and the console."""
        out = {
            "method": self.method,
            "examples": self.examples,
            "steps": self.steps,
            "train_loss": None if self.train_loss is None else round(self.train_loss, 6),
            "tokens": self.tokens,
            "weights_sha256": weights_hash(self.out_dir),
        }
        if self.skipped:
            out["skipped"] = self.skipped
        return out


# ------------------------------------------------------------------------------------------- data
def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise TuneError(f"snapshot file not found: {path} (run `ownllm rlhf snapshot` first)")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise TuneError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
    return rows


def _dataset(rows: list[dict], columns: list[str], path: Path, tok, max_length: int):
    from datasets import Dataset

    for i, row in enumerate(rows):
        missing = [c for c in columns if c not in row]
        if missing:
            raise TuneError(f"{path}: row {i} lacks {missing} (expected columns {columns})")
    completions = [c for c in columns if c not in ("prompt", "label")]
    rows = fit_prompts(rows, tok, max_length, completions)
    # In-memory dataset in snapshot order: no cache files, no fingerprint-dependent behaviour.
    return Dataset.from_list([{c: r[c] for c in columns} for r in rows])


def fit_prompts(rows: list[dict], tok, max_length: int, completion_keys: list[str]) -> list[dict]:
    """Fit each prompt so prompt + longest completion + EOS fit in ``max_length`` tokens.

    Prompts are rebuilt by the one FIM prompt builder, so truncation happens inside the sentinel structure:
    a long FIM prompt keeps ``<fim_prefix>``, ``<fim_suffix>`` and ``<fim_middle>`` and the text next to the
    cursor, exactly as the gateway serves it (cutting the rendered string from the left used to drop the
    sentinels of every long prompt). Completions longer than half the budget are cut from the right so a
    prompt always keeps some context.
    """
    from pipeline.fim_prompt import FimPromptBuilder, parse_fim_text

    builder = FimPromptBuilder(tok, max_length)
    out = []
    half = max_length // 2
    for row in rows:
        row = dict(row)
        longest = 0
        for k in completion_keys:
            ids = tok(row[k], add_special_tokens=False)["input_ids"]
            if len(ids) > half:
                row[k] = tok.decode(ids[:half])
            longest = max(longest, min(len(ids), half))
        parts = parse_fim_text(row["prompt"])
        prefix, suffix = parts if parts else (row["prompt"], None)
        row["prompt"] = builder.text(prefix, suffix, longest + 1)
        out.append(row)
    return out


def parent_model_dir(cfg: RLHFConfig) -> Path:
    """The model to start from: the one the snapshot recorded as in production, else ``rlhf.base_model``."""
    meta = Path(cfg.snapshot_dir) / PARENT_FILE
    if meta.is_file():
        return Path(json.loads(meta.read_text(encoding="utf-8"))["model_dir"])
    return Path(cfg.base_model)


def weights_hash(model_dir: str | Path) -> str:
    """sha256 over the model's weight files (feedback.lineage.weights_hash, the one definition)."""
    from feedback.lineage import weights_hash as _weights_hash

    try:
        return _weights_hash(model_dir)
    except FileNotFoundError as exc:
        raise TuneError(str(exc)) from None


def preference_margins(model_dir: str | Path, pairs: list[dict]) -> list[float]:
    """log p(chosen | prompt) - log p(rejected | prompt) per pair, each completion's tokens + EOS summed: the margin
    DPO pushes up, measured on held-out pairs (prompts as given: fit them with :func:`fit_prompts` first)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def logp(prompt: str, completion: str) -> float:
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        c = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([p + c])).logits[0, :-1].float(), -1)
        return float(lp[torch.arange(len(p) - 1, len(p) + len(c) - 1), torch.tensor(c)].sum())

    return [logp(r["prompt"], r["chosen"]) - logp(r["prompt"], r["rejected"]) for r in pairs]


# ---------------------------------------------------------------------------------------- trainers
def _common_args(params: RLHFParams, stage: str, epochs: float, max_steps: int | None, report_to: str,
                 lr: float | None = None) -> dict:
    cfg = params.rlhf
    return dict(
        output_dir=str(Path(cfg.work_dir) / stage),
        seed=params.seed,
        data_seed=params.seed,
        num_train_epochs=epochs,
        max_steps=max_steps if max_steps is not None else -1,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=lr if lr is not None else cfg.lr if stage == "sft" or cfg.dpo_lr is None else cfg.dpo_lr,
        lr_scheduler_type="cosine",
        warmup_ratio=0.1,
        weight_decay=0.0,
        logging_steps=cfg.log_every,
        save_strategy="no",
        report_to=report_to,
        run_name=f"rlhf-{stage}",
        use_cpu=_use_cpu(cfg),
        bf16=not _use_cpu(cfg) and cfg.bf16_on_gpu,
        dataloader_num_workers=0,
        disable_tqdm=False,
        max_length=cfg.max_length,
    )


def _use_cpu(cfg: RLHFConfig) -> bool:
    if cfg.device == "cpu":
        return True
    import torch

    if cfg.device == "gpu" and not torch.cuda.is_available():
        raise TuneError("rlhf.device is 'gpu' but no CUDA device is available")
    return not torch.cuda.is_available()


def _load(model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (model_dir / "config.json").is_file():
        raise TuneError(f"parent model not found: {model_dir} (no config.json; train or register a model first)")
    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token is None:
        raise TuneError(f"tokenizer in {model_dir} has no pad token")
    # Loaded from a directory, so name_or_path is set and TRL can build the reference model from it.
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
    return model, tok


def _copy_model(src: Path, out: Path) -> None:
    """Pass the parent through unchanged (no data to tune on): the next stage still finds a model."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        if f.is_file():
            shutil.copy2(f, out / f.name)


def _save(trainer, tok, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    trainer.save_model(str(out))
    tok.save_pretrained(str(out))
    # TrainingArguments holds timestamps/paths; it is not part of the model, and would break byte-identity.
    (out / "training_args.bin").unlink(missing_ok=True)


def _train(trainer) -> tuple[int, float | None, float]:
    t0 = time.perf_counter()
    out = trainer.train()
    return trainer.state.global_step, float(out.training_loss), time.perf_counter() - t0


def _seed_all(seed: int) -> None:
    from transformers import set_seed

    set_seed(seed, deterministic=False)


def sft_learning_rate(cfg: RLHFConfig, parent_dir: str | Path) -> float:
    """``rlhf.lr`` from the base model; ``rlhf.retune_lr`` (when set) from a version a refresh already tuned. On the
    embedded default the base's rate, 3e-3, applied again to round 1's tuned model lowered its accepted characters
    per cursor significantly in round 2 (docs/BENCHMARKS.md)."""
    if cfg.retune_lr is None or Path(parent_dir).resolve() == Path(cfg.base_model).resolve():
        return cfg.lr
    return cfg.retune_lr


def run_sft(params: RLHFParams, report_to: str = "none", model_dir: Path | None = None) -> TuneResult:
    """SFT the parent on the snapshot's bounties → ``rlhf.sft_out``."""
    from trl import SFTConfig, SFTTrainer

    cfg = params.rlhf
    src = model_dir or parent_model_dir(cfg)
    out = Path(cfg.sft_out)
    path = Path(cfg.snapshot_dir) / SFT_FILE
    rows = read_jsonl(path)
    if not rows:
        _copy_model(src, out)
        return TuneResult("copy", 0, 0, None, 0, 0.0, out)
    _seed_all(params.seed)
    model, tok = _load(src)
    ds = _dataset(rows, ["prompt", "completion"], path, tok, cfg.max_length)
    args = SFTConfig(
        **_common_args(params, "sft", cfg.sft_epochs, cfg.sft_max_steps, report_to, sft_learning_rate(cfg, src)),
        completion_only_loss=True,  # learn the solution, not to reproduce the instruction
        packing=False,
        dataset_num_proc=None,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    tokens = _epoch_tokens(trainer.train_dataset) * _epochs_done(trainer, args, len(ds))
    steps, loss, secs = _train(trainer)
    _save(trainer, tok, out)
    return TuneResult("sft", len(ds), steps, loss, int(tokens), secs, out)


def preference_method(cfg: RLHFConfig, n_pairs: int) -> str:
    """DPO on pairs, unless params ask for KTO or there are too few pairs to learn a preference from."""
    if cfg.method == "kto" or n_pairs < cfg.min_pairs:
        return "kto"
    return "dpo"


def run_preference(params: RLHFParams, report_to: str = "none", model_dir: Path | None = None) -> TuneResult:
    """DPO (or KTO) from the SFT model → ``rlhf.tuned_out``; the SFT model is also the reference.

    ``rlhf.method: none`` switches the learner off: the SFT model is passed through unchanged (byte-identical
    files), so the gate judges SFT alone, and the stage's report says it was skipped."""
    cfg = params.rlhf
    src = model_dir or Path(cfg.sft_out)
    out = Path(cfg.tuned_out)
    if cfg.method == "none":
        if not (src / "config.json").is_file():
            raise TuneError(f"no model to pass through at {src} (run `ownllm rlhf sft` first)")
        _copy_model(src, out)
        return TuneResult("none", 0, 0, None, 0, 0.0, out,
                          skipped=f"rlhf.method: none (the SFT model {src} passed through unchanged)")
    snap = Path(cfg.snapshot_dir)
    pairs = read_jsonl(snap / PAIRS_FILE)
    method = preference_method(cfg, len(pairs))
    if method == "dpo":
        return _run_dpo(params, src, out, pairs, snap / PAIRS_FILE, report_to)
    unpaired = read_jsonl(snap / UNPAIRED_FILE)
    labels = {bool(r.get("label")) for r in unpaired}
    if labels != {True, False}:
        # KTO needs desirable and undesirable examples; with one kind only there is no preference to learn.
        _copy_model(src, out)
        return TuneResult("copy", len(unpaired), 0, None, 0, 0.0, out)
    return _run_kto(params, src, out, unpaired, snap / UNPAIRED_FILE, report_to)


def _run_dpo(params: RLHFParams, src: Path, out: Path, rows: list[dict], path: Path, report_to: str) -> TuneResult:
    from trl import DPOConfig, DPOTrainer

    cfg = params.rlhf
    _seed_all(params.seed)
    model, tok = _load(src)
    ref, _ = _load(src)
    ds = _dataset(rows, ["prompt", "chosen", "rejected"], path, tok, cfg.max_length)
    # rpo_alpha: an NLL term on the chosen completion, so DPO cannot lower the chosen text's likelihood when
    # chosen and rejected differ by a few tokens (the same-cursor case; Smaug/DPOP). RPO in TRL 1.x is the
    # loss list ["sigmoid", "sft"] with weights [1, rpo_alpha] (its older `rpo_alpha` argument is gone).
    rpo = {} if cfg.rpo_alpha is None else {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, cfg.rpo_alpha]}
    args = DPOConfig(**_common_args(params, "dpo", cfg.dpo_epochs, cfg.dpo_max_steps, report_to), beta=cfg.beta,
                     **rpo)
    trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=ds, processing_class=tok)
    # The prompt is run twice per pair (with the chosen and with the rejected completion).
    tokens = _epoch_tokens(trainer.train_dataset, prompt_twice=True) * _epochs_done(trainer, args, len(ds))
    steps, loss, secs = _train(trainer)
    _save(trainer, tok, out)
    return TuneResult("dpo", len(ds), steps, loss, int(tokens), secs, out)


def _run_kto(params: RLHFParams, src: Path, out: Path, rows: list[dict], path: Path, report_to: str) -> TuneResult:
    from trl import KTOConfig, KTOTrainer

    cfg = params.rlhf
    _seed_all(params.seed)
    model, tok = _load(src)
    ref, _ = _load(src)
    ds = _dataset(rows, ["prompt", "completion", "label"], path, tok, cfg.max_length)
    # KTO's KL estimate pairs each example with another one of its batch, so a batch needs two or more.
    common = _common_args(params, "kto", cfg.dpo_epochs, cfg.dpo_max_steps, report_to)
    common["per_device_train_batch_size"] = max(2, cfg.batch_size)
    args = KTOConfig(**common, beta=cfg.beta)
    trainer = KTOTrainer(model=model, ref_model=ref, args=args, train_dataset=ds, processing_class=tok)
    tokens = _epoch_tokens(trainer.train_dataset) * _epochs_done(trainer, args, len(ds))
    steps, loss, secs = _train(trainer)
    _save(trainer, tok, out)
    return TuneResult("kto", len(ds), steps, loss, int(tokens), secs, out)


def _epoch_tokens(ds, prompt_twice: bool = False) -> int:
    """Tokens one pass over the tokenized dataset feeds the policy (for throughput, not for the loss).

    Counted from TRL's tokenized columns (``input_ids``, ``prompt_ids``, ``chosen_ids``, ...): whatever
    names this TRL version uses, every token id column is summed.
    """
    cols = [c for c in ds.column_names if c == "input_ids" or (c.endswith("_ids") and "type" not in c and "KL" not in c)]
    total = sum(len(x) for c in cols for x in ds[c])
    if prompt_twice and "prompt_ids" in cols:
        total += sum(len(x) for x in ds["prompt_ids"])
    return total


def _epochs_done(trainer, args, n_examples: int) -> float:
    """How many passes over the data the run makes: max_steps caps num_train_epochs."""
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps
    steps_per_epoch = max(1, -(-n_examples // per_step))
    if args.max_steps and args.max_steps > 0:
        return args.max_steps / steps_per_epoch
    return float(args.num_train_epochs)
