"""`ownllm tokenizer train`: byte-level BPE on a seeded random subsample of data/dedup/.

The sample is drawn from the *train* split only (records.split_of with shards.val_frac), so the
validation documents are true held-out data for the report and for the model's validation loss.
Same params → same sample → the same ``tokenizer.json``, byte for byte (HF's BPE trainer breaks merge
ties by the pair itself, so training is deterministic).

vocab_size: the embedded default (params.yaml) is 2048 so that CPU training is quick: the output layer
dominates a 4 x 128 model's compute, and 2048 trains 2.1x faster than 8192 while compressing code only 3%
better than raw bytes (docs/BENCHMARKS.md); use 32768 for real runs (the size replit-code-v1 used).
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import pyarrow as pa
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from pipeline.config import Params, TokenizerConfig
from pipeline.data.records import read_docs, split_of
from pipeline.tokenizer import EOS, PAD, special_tokens
from pipeline.tokenizer import measure
from pipeline.tokenizer.pretokenize import baseline_pre_tokenizer, code_pre_tokenizer

STAGE = "tokenizer"


def split_corpus(docs: pa.Table, val_frac: float, sample_docs: int, seed: int) -> tuple[list[int], list[int]]:
    """Row indices of the training sample (seeded, from the train split) and of the held-out docs."""
    ids = docs.column("id").to_pylist()
    train = [i for i, d in enumerate(ids) if split_of(d, val_frac) == "train"]
    heldout = [i for i, d in enumerate(ids) if split_of(d, val_frac) == "val"]
    if len(train) > sample_docs:
        train = sorted(random.Random(seed).sample(train, sample_docs))
    return train, heldout


def train_bpe(texts: list[str], cfg: TokenizerConfig, pre_tokenizer: pre_tokenizers.PreTokenizer) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=special_tokens(cfg.reserved_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is ever unknown
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer, length=len(texts))
    return tok


def save_for_transformers(tok: Tokenizer, cfg: TokenizerConfig, out: Path) -> None:
    """``tokenizer.json`` + ``tokenizer_config.json`` + ``special_tokens_map.json`` for AutoTokenizer."""
    from transformers import PreTrainedTokenizerFast

    specials = special_tokens(cfg.reserved_tokens)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        bos_token=EOS,  # no BOS is ever added; set so models can read bos_token_id
        pad_token=PAD,
        unk_token=None,
        additional_special_tokens=specials[1:],
        model_input_names=["input_ids", "attention_mask"],
        clean_up_tokenization_spaces=False,  # decode must give back the exact source text
    )
    out.mkdir(parents=True, exist_ok=True)
    for old in out.iterdir():  # a stale file from another vocabulary must not survive
        if old.is_file():
            old.unlink()
    hf.save_pretrained(str(out))


def run_tokenizer(params: Params) -> tuple[dict, dict]:
    cfg = params.tokenizer
    docs = read_docs(params.data.dedup.out, columns=["id", "lang", "content"])
    if docs.num_rows == 0:
        raise ValueError(f"no documents in {params.data.dedup.out}")
    train_idx, heldout_idx = split_corpus(docs, params.shards.val_frac, cfg.sample_docs, params.seed)
    contents, langs = docs.column("content").to_pylist(), docs.column("lang").to_pylist()
    sample = [contents[i] for i in train_idx]
    heldout, heldout_langs = [contents[i] for i in heldout_idx], [langs[i] for i in heldout_idx]
    if not heldout:  # a tiny corpus: measure on the sample rather than report nothing
        heldout, heldout_langs = sample, [langs[i] for i in train_idx]

    timings = {}
    t0 = time.perf_counter()
    ours = train_bpe(sample, cfg, code_pre_tokenizer())
    timings["train_s"] = time.perf_counter() - t0
    save_for_transformers(ours, cfg, Path(cfg.out))
    t0 = time.perf_counter()
    baseline = train_bpe(sample, cfg, baseline_pre_tokenizer())
    timings["baseline_train_s"] = time.perf_counter() - t0

    n_special = len(special_tokens(cfg.reserved_tokens))
    report = {
        "vocab_size": ours.get_vocab_size(),
        "special_tokens": n_special,
        "sample": {"documents": len(sample), "bytes": sum(len(t.encode("utf-8")) for t in sample), "seed": params.seed},
        "heldout": {"documents": len(heldout), "bytes": sum(len(t.encode("utf-8")) for t in heldout)},
        "lossless_failures_heldout": measure.lossless_failures(ours, heldout),
    }
    for name, tok in (("ours", ours), ("baseline_bytelevel", baseline)):
        report[name] = {
            "bytes_per_token": measure.bytes_per_token(tok, heldout, heldout_langs),
            "vocab_coverage": measure.vocab_coverage(tok, heldout, n_special),
            "indentation": measure.indentation_cost(tok, heldout),
            "indentation_probe_tokens": measure.indentation_probe(tok),
        }
    b_ours, b_base = report["ours"]["bytes_per_token"], report["baseline_bytelevel"]["bytes_per_token"]
    report["bytes_per_token_ratio_vs_baseline"] = {k: round(b_ours[k] / b_base[k], 4) for k in b_ours if k in b_base}
    return report, timings


def main(args) -> int:
    from pipeline.cli import UserError
    from pipeline.config import load_params
    from pipeline.tracking import say, stage_run

    params = load_params(args.params)
    with stage_run(STAGE, params) as run:
        try:
            report, timings = run_tokenizer(params)
        except (FileNotFoundError, ValueError) as exc:
            raise UserError(str(exc)) from None
        run.summary(report)
        run.log(timings)
    ratio = report["bytes_per_token_ratio_vs_baseline"].get("all", 0.0)
    say(f"[tokenizer] vocab {report['vocab_size']} trained on {report['sample']['documents']} docs "
        f"({report['sample']['bytes'] / 1e6:.1f} MB) in {timings['train_s']:.1f}s; held-out bytes/token "
        f"{report['ours']['bytes_per_token'].get('all', 0):.3f} = {ratio:.3f}x the ByteLevel baseline → {params.tokenizer.out}")
    return 0
