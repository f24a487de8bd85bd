"""Tokenizer training time and shard-writing throughput vs raw `tokenizers` encode_batch.

    .venv/bin/python benchmarks/bench_tokenize.py [--params params.yaml] [--repeat 2]

Reads the documents of ``data.dedup.out`` and the tokenizer of ``tokenizer.out`` named in the params
file (run `ownllm tokenizer train` first). Prints, for the same text in the same run:
  * tokenizer training time on the configured sample;
  * raw ``Tokenizer.encode_batch`` (and ``encode_batch_fast``) over all documents in one call;
  * the shards stage's tokenize → pack → MDS write path (pipeline.data.shards.write_shards) into a
    temporary directory, end to end.
Target (issue 3): stage throughput >= 0.7x raw encode_batch. Best of --repeat runs each (shared CPUs).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")


def best_of(repeat: int, fn):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()

    from pipeline.config import load_params
    from pipeline.data.records import read_docs
    from pipeline.data.shards import write_shards
    from pipeline.tokenizer import load_fast
    from pipeline.tokenizer.pretokenize import code_pre_tokenizer
    from pipeline.tokenizer.train import split_corpus, train_bpe

    params = load_params(args.params)
    docs = read_docs(params.data.dedup.out)
    texts = docs.column("content").to_pylist()
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    print(f"corpus: {docs.num_rows} documents, {mb:.1f} MB of source ({params.data.dedup.out}); cores: {os.cpu_count()}")

    train_idx, _ = split_corpus(docs.select(["id"]), params.shards.val_frac, params.tokenizer.sample_docs, params.seed)
    sample = [texts[i] for i in train_idx]
    t_train, _ = best_of(1, lambda: train_bpe(sample, params.tokenizer, code_pre_tokenizer()))
    print(f"tokenizer training: {t_train:.2f} s on {len(sample)} docs "
          f"({sum(len(t.encode()) for t in sample) / 1e6:.1f} MB), vocab {params.tokenizer.vocab_size}")

    tok = load_fast(params.tokenizer.out)
    t_raw, encs = best_of(args.repeat, lambda: tok.encode_batch(texts, add_special_tokens=False))
    n_tokens = sum(len(e.ids) for e in encs)
    del encs
    t_fast, _ = best_of(args.repeat, lambda: tok.encode_batch_fast(texts, add_special_tokens=False))
    with tempfile.TemporaryDirectory() as tmp:
        staged = params.model_copy(update={"shards": params.shards.model_copy(update={"out": tmp})})
        t_stage, _ = best_of(args.repeat, lambda: write_shards(docs, staged))

    def line(name: str, secs: float) -> str:
        return f"{name:34s} {secs:7.2f} s  {mb / secs:6.2f} MB/s  {n_tokens / secs / 1e6:6.3f} M tokens/s"

    print(line("raw encode_batch (one call)", t_raw))
    print(line("raw encode_batch_fast (one call)", t_fast))
    print(line("shards stage (encode+pack+MDS)", t_stage))
    print(f"stage / raw encode_batch throughput: {t_raw / t_stage:.2f}x (target >= 0.70x); "
          f"vs encode_batch_fast: {t_fast / t_stage:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
