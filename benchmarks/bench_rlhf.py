"""RLHF tuning cost on this machine: per-stage time and tokens/s of snapshot, SFT and DPO (and KTO).

Uses ``--model`` (default: models/base when it exists) or else a freshly initialised model of the
embedded default's architecture (params.yaml `model:`, d=256, 4 layers) with a BPE tokenizer trained
on a few stdlib files; throughput does not depend on the weights. The feedback store is a temporary
SQLite file filled like the simulated IDE user does: for cursors in real stdlib files, the true next
lines accepted and two wrong completions rejected, plus bounties.

    python benchmarks/bench_rlhf.py [--model DIR] [--contexts 48] [--steps 30]
"""

from __future__ import annotations

import argparse
import os
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OWNLLM_WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

STDLIB = Path(sysconfig.get_paths()["stdlib"])
FILES = ["textwrap.py", "shlex.py", "fnmatch.py", "glob.py", "heapq.py", "queue.py", "copy.py", "string.py"]


def default_model(out: Path, params) -> Path:
    from benchmarks.tiny_models import stdlib_texts, tiny_model

    return tiny_model(out, stdlib_texts(FILES), 4096, params.model)


def fill_store(url: str, model_dir: Path, contexts: int) -> None:
    from feedback.db import session_factory, upgrade
    from feedback.models import Completion, FeedbackKind
    from feedback.store import (FeedbackInput, add_bounty, get_or_create_user, record_feedback,
                                register_model_version, sha256)

    upgrade(url)
    lines = "".join((STDLIB / f).read_text() for f in FILES).splitlines(keepends=True)
    with session_factory(url).begin() as s:
        mv = register_model_version(s, "base", str(model_dir), state="all")
        user = get_or_create_user(s, "bench")
        events = []
        for i in range(contexts):
            at = 30 + i * (len(lines) - 60) // contexts
            prefix, truth = "".join(lines[at - 20:at]), "".join(lines[at:at + 2])
            for j, (text, ok) in enumerate(((truth, True), ("    pass\n", False), ("    return None\n", False))):
                rid = f"r{i}-{j}"
                s.add(Completion(request_id=rid, user_id=user.id, model_version_id=mv.id, language="python",
                                 prompt=prefix, completion=text, prompt_hash=sha256(prefix), finish_reason="stop",
                                 prompt_tokens=1, completion_tokens=1, latency_ms=1.0))
                events.append(FeedbackInput(rid, FeedbackKind.accepted if ok else FeedbackKind.rejected))
            if i % 4 == 0:
                add_bounty(s, title=f"bounty {i}", instruction=f"Continue:\n{prefix[-300:]}", language="python",
                           solution=truth)
        s.flush()
        record_feedback(s, user, events)


def plain_loop_tokens_per_s(model_dir: Path, rows: list[dict], batch: int, steps: int, max_length: int) -> float:
    """Baseline: the same model and SFT text through a hand-written training loop (no TRL, no Trainer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5)
    texts = [r["prompt"] + r["completion"] for r in rows]
    tokens, t0 = 0, time.perf_counter()
    for step in range(steps):
        chunk = [texts[(step * batch + i) % len(texts)] for i in range(batch)]
        enc = tok(chunk, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        loss = model(**enc, labels=enc["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        tokens += int(enc["attention_mask"].sum())
    return tokens / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--contexts", type=int, default=48)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()

    from pipeline.config import load_params
    from rlhf.snapshot import take_snapshot, write_snapshot
    from rlhf.tune import run_preference, run_sft

    tmp = Path(tempfile.mkdtemp(prefix="bench-rlhf-"))
    params = load_params("params.yaml")
    model = Path(args.model) if args.model else Path("models/base")
    if not (model / "config.json").is_file():
        model = default_model(tmp / "model", params)
        print(f"model: freshly initialised default architecture ({params.model.d_model}d x {params.model.n_layers} layers)")
    else:
        print(f"model: {model}")
    rl = params.rlhf.model_copy(update={
        "snapshot_dir": str(tmp / "feedback"), "base_model": str(model), "sft_out": str(tmp / "sft"),
        "tuned_out": str(tmp / "tuned"), "work_dir": str(tmp / "work"), "sft_max_steps": args.steps,
        "dpo_max_steps": args.steps})
    params = params.model_copy(update={"rlhf": rl})
    url = f"sqlite:///{tmp / 'feedback.db'}"
    fill_store(url, model, args.contexts)

    t0 = time.perf_counter()
    snap, parent = take_snapshot(params, url)
    write_snapshot(snap, rl.snapshot_dir, parent)
    t_snap = time.perf_counter() - t0
    print(f"snapshot: {t_snap:.1f}s  ({len(snap.sft)} sft, {len(snap.pairs)} pairs, {len(snap.unpaired)} unpaired)")
    rows = [("snapshot", t_snap, None)]
    for name, fn, p in (("sft", run_sft, params), ("dpo", run_preference, params),
                        ("kto", run_preference, params.model_copy(update={"rlhf": rl.model_copy(update={
                            "method": "kto", "tuned_out": str(tmp / "kto")})}))):
        t0 = time.perf_counter()
        res = fn(p)
        wall = time.perf_counter() - t0
        rows.append((name, wall, res))
        print(f"{name}: {wall:.1f}s wall ({res.seconds:.1f}s in trainer.train), {res.steps} steps x batch "
              f"{rl.batch_size}, {res.tokens} tokens → {res.tokens_per_s:.0f} tokens/s")
    base_tps = plain_loop_tokens_per_s(model, snap.sft, rl.batch_size, args.steps, rl.max_length)
    print(f"baseline: plain PyTorch fwd+bwd+AdamW loop on the same SFT rows: {base_tps:.0f} tokens/s")
    for name, _, res in rows[1:]:
        print(f"{name}: {res.tokens_per_s / base_tps:.2f}x the plain loop's tokens/s")
    print("stage     wall_s  train_s  tokens/s")
    for name, wall, res in rows:
        print(f"{name:<9} {wall:6.1f}  {res.seconds if res else 0:7.1f}  {res.tokens_per_s if res else 0:8.0f}")


if __name__ == "__main__":
    main()
