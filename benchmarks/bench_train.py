"""Training tokens/s through Composer vs a plain PyTorch loop: same model, batch, data, optimiser, one process.

Usage: python benchmarks/bench_train.py [--params params.yaml] [--steps 40] [--d-model N --layers N]

Data: the shards and tokenizer named in params when they exist; otherwise a throw-away BPE tokenizer and
MDS shards built from the Python stdlib in a temp dir (so the benchmark runs on a fresh checkout). Both
loops read the same StreamingDataset through the same FIM collator, use DecoupledAdamW with the same
cosine-warmup schedule and gradient clipping, and time the same steps after a warm-up.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OWNLLM_WANDB_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_stdlib_data(root: Path, seq_len: int, vocab: int) -> tuple[Path, Path]:
    import hashlib

    import numpy as np
    from streaming import MDSWriter

    from benchmarks.tiny_models import fit_tokenizer, stdlib_texts

    texts = stdlib_texts(first=150)
    tok_dir = root / "tokenizer"
    hf = fit_tokenizer(tok_dir, texts, vocab)
    stream, spans_all, samples = [], [], []
    for t in texts:
        did = hashlib.sha1(t.encode()).hexdigest()[:16]
        ids = hf(t, add_special_tokens=False)["input_ids"]
        for pos in range(0, len(ids), seq_len):
            piece = ids[pos:pos + seq_len]
            spans_all.append([did, pos, len(stream) % seq_len, len(piece)])
            stream.extend(piece)
        stream.append(hf.eos_token_id)
    del spans_all  # simple packing below: one span per sample slice is enough for a throughput benchmark
    for i in range(0, len(stream) - seq_len, seq_len):
        samples.append({"tokens": np.asarray(stream[i:i + seq_len], np.int32), "doc_spans": [["bench", i, 0, seq_len]]})
    for split, part in (("train", samples[:-32]), ("val", samples[-32:])):
        with MDSWriter(out=str(root / "shards" / split), columns={"tokens": "ndarray:int32", "doc_spans": "json"}) as w:
            for s in part:
                w.write(s)
    return tok_dir, root / "shards"


def composer_run(params, steps: int, warm: int) -> float:
    from composer.core import Callback

    from pipeline.train.trainer import build_trainer

    class Clock(Callback):
        def __init__(self):
            self.t0 = self.t1 = None

        def batch_start(self, state, logger):
            if int(state.timestamp.batch.value) == warm:
                self.t0 = time.perf_counter()

        def batch_end(self, state, logger):
            self.t1 = time.perf_counter()

    clock = Clock()
    trainer, _, _ = build_trainer(params, "cpu", "fp32", extra_callbacks=[clock])
    trainer.fit()
    trainer.close()
    return (steps - warm) * params.train.global_batch_size * params.shards.max_seq_len / (clock.t1 - clock.t0)


def plain_run(params, steps: int, warm: int) -> float:
    import math

    import torch
    from composer.optim import DecoupledAdamW
    from torch.utils.data import DataLoader

    from pipeline.train import data as tdata
    from pipeline.train.model import build_model

    t = params.train
    tok = tdata.load_tokenizer(params)
    model = build_model(params.model, tok, params.seed)
    model.train()
    ds = tdata.make_dataset(params, "train", t.global_batch_size)
    dl = DataLoader(ds, batch_size=t.global_batch_size, collate_fn=tdata.Collator.from_params(params, tok),
                    drop_last=True)
    opt = DecoupledAdamW(model.parameters(), lr=t.lr, betas=t.betas, eps=t.eps, weight_decay=t.weight_decay)
    warmup = int(t.warmup.removesuffix("ba"))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: s / warmup if s < warmup else
                                              t.lr_min_ratio + (1 - t.lr_min_ratio) * 0.5 *
                                              (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup))))
    t0 = None
    for step, batch in enumerate(dl):
        if step == warm:
            t0 = time.perf_counter()
        if step == steps:
            break
        loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
    elapsed = time.perf_counter() - t0
    tdata.release(ds)
    return (steps - warm) * t.global_batch_size * params.shards.max_seq_len / elapsed


def main() -> None:
    import torch

    from pipeline.config import load_params, parse_params

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup-steps", type=int, default=5)
    ap.add_argument("--d-model", type=int)
    ap.add_argument("--layers", type=int)
    args = ap.parse_args()

    base = load_params(args.params).model_dump(mode="json", exclude={"source_file"})
    tmp = Path(tempfile.mkdtemp(prefix="bench_train_"))
    if not (Path(base["shards"]["out"]) / "train" / "index.json").is_file():
        tok_dir, shards = build_stdlib_data(tmp, base["shards"]["max_seq_len"], base["tokenizer"]["vocab_size"])
        base["tokenizer"]["out"], base["shards"]["out"] = str(tok_dir), str(shards)
    if args.d_model:
        base["model"]["d_model"] = args.d_model
    if args.layers:
        base["model"]["n_layers"] = args.layers
    base["tracking"]["wandb_mode"] = "disabled"
    base["train"].update(max_duration=f"{args.steps}ba", save_folder=str(tmp / "ckpt"), reports_dir=str(tmp / "rep"),
                         final_model=str(tmp / "final"), eval_interval="100000ba", save_interval="100000ba",
                         device="cpu", log_every=10_000)
    params = parse_params(base, "bench")
    results = {}
    for name, fn in (("plain", plain_run), ("composer", composer_run), ("plain2", plain_run)):
        results[name] = fn(params, args.steps, args.warmup_steps)
        print(f"{name:9s} {results[name]:9.0f} tokens/s", flush=True)
    plain = (results["plain"] + results["plain2"]) / 2  # before and after, to average out load drift
    m = params.model
    print(f"model d={m.d_model} layers={m.n_layers} batch={params.train.global_batch_size}x{params.shards.max_seq_len} "
          f"threads={torch.get_num_threads()} steps={args.steps} (first {args.warmup_steps} untimed)")
    print(f"composer/plain ratio: {results['composer'] / plain:.3f}")


if __name__ == "__main__":
    main()
