"""Bisecting a loss spike: replays and wall time of delta debugging vs one replay per document.

Builds the planted-spike scenario of tests/pipeline/test_bisect.py (stdlib files + one document of
random CJK characters, real shards stage, a tiny high-LR run that spikes at step 71), then for each
checkpoint spacing runs ``ownllm bisect``'s search and the naive alternative: the confirming replay plus
one replay per window document with that document dropped. Prints one line per setting.

    .venv/bin/python benchmarks/bench_bisect.py [--save-every 40 8 72]

``--save-every 72`` leaves no checkpoint before the spike: the window is the whole run from step 0.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests/pipeline")]
os.environ.setdefault("OWNLLM_WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def tiny_tokenizer(out: Path) -> Path:
    """The test suite's tiny BPE tokenizer (tests/conftest.py) rebuilt: same corpus, vocabulary and tokens."""
    from conftest import TINY_CORPUS_FILES, stdlib_files

    from benchmarks.tiny_models import fit_tokenizer

    fit_tokenizer(out, list(stdlib_files(TINY_CORPUS_FILES).values()), 1024 + 16)  # the 16 reserved take no merges
    return out


def scenario(root: Path, tokenizer: Path, save_every: int):
    import test_bisect as tb
    from train_helpers import STDLIB

    from pipeline.config import parse_params
    from pipeline.data.records import DOC_SCHEMA, make_doc, to_table, write_docs
    from pipeline.data.shards import run_shards
    from pipeline.train.trainer import train

    docs = [make_doc("stdlib", n, "python", (STDLIB / n).read_text(encoding="utf-8")) for n in tb.CORPUS]
    write_docs(to_table(docs + [tb.planted_doc([d["id"] for d in docs], 0.2)], DOC_SCHEMA), root / "dedup")
    (root / "exclude_ids.txt").write_text("#\n", encoding="utf-8")
    params = tb.scenario_params(root, tokenizer)
    data = params.model_dump(mode="json", exclude={"source_file"})
    data["train"]["save_interval"] = f"{save_every}ba"
    params = parse_params(data, "bench")
    run_shards(params)
    train(params)
    return params


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--save-every", type=int, nargs="+", default=[40, 8, 72])
    args = ap.parse_args()

    import contextlib
    import io
    import json

    from pipeline.bisect.cli import bisect_spike
    from pipeline.bisect.replay import checkpoint_before, load_window, replay
    from pipeline.train.data import load_tokenizer

    tmp = Path(tempfile.mkdtemp(prefix="bench-bisect-"))
    tok = tiny_tokenizer(tmp / "tok")
    for every in args.save_every:
        root = tmp / f"every{every}"
        root.mkdir()
        with contextlib.redirect_stdout(io.StringIO()):
            params = scenario(root, tok, every)
            spike = json.loads((root / "reports/train/spikes.json").read_text())[0]
            report, timings = bisect_spike(params, spike)
            ckpt, start = checkpoint_before(params, spike["step"])
            window = load_window(params, start, spike["step"], load_tokenizer(params))
            t0 = time.perf_counter()
            base = replay(params, window, ckpt)
            singles = [replay(params, window, ckpt, {d}) for d in window.documents()]
            naive_s = time.perf_counter() - t0
        threshold = report["threshold"]
        naive_named = [d for d, r in zip(window.documents(), singles) if r.spike_loss is None or r.spike_loss < threshold]
        print(f"save every {every:>2} ba: window {start}..{spike['step']} ({report['window']['documents']} docs) | "
              f"ddmin: {timings['replays']} replays, {timings['seconds']:.1f} s, named {len(report['documents'])} "
              f"| naive: {len(singles) + 1} replays, {naive_s:.1f} s, named {len(naive_named)} "
              f"| ratio: {timings['replays'] / (len(singles) + 1):.2f}x replays, {timings['seconds'] / naive_s:.2f}x time "
              f"| base replay equals run: {base.spike_loss == spike['loss']}", flush=True)


if __name__ == "__main__":
    main()
