"""Data pipeline benchmark: clean steps (MB/s each) and near dedup vs datasketch, on the embedded corpus.

    .venv/bin/python benchmarks/bench_data.py [--params params.yaml] [--originals 60] [--repeat 1]

Reads data/raw (running `ownllm data ingest` first when it is missing). Prints

- for each clean step: documents and MB it saw, seconds, MB/s (one process, so steps compare);
- near dedup on the corpus, text → clusters: ours (vectorised, all cores) vs datasketch ``MinHash`` +
  ``MinHashLSH`` (its documented usage: one ``MinHash`` per document, ``update_batch`` over the
  shingles, ``insert`` then ``query``), same shingles, ``num_perm``, threshold and seed, in the same run;
- F1 (pairwise over clusters) of both on the labelled near-duplicate set of benchmarks/dedup_labelled.py.

Each baseline is run twice: with datasketch's default banding (its optimum for equal false positive and
negative weights) and with our banding, so that the speed ratio is not a banding artefact.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.dedup_labelled import build_neardup_set, pairwise_scores  # noqa: E402
from pipeline.config import DedupConfig, Params, load_params  # noqa: E402
from pipeline.data import minhash  # noqa: E402
from pipeline.data.dedup import compute_signatures, near_duplicates  # noqa: E402
from pipeline.data.dedup_spec import SignatureSpec, banding  # noqa: E402
from pipeline.data.records import read_docs  # noqa: E402


# ------------------------------------------------------------------------------------------ clean
def bench_clean(params: Params, docs: list[dict]) -> None:
    try:
        from pipeline.data.clean import clean_steps
    except ImportError as exc:
        print(f"clean: skipped, pipeline.data.clean.clean_steps is not available ({exc})")
        return
    print(f"\nclean steps, one process, {len(docs)} documents in (CPU seconds of this process, robust to load):")
    print(f"  {'step':<22}{'docs':>7}{'MB':>9}{'cpu s':>9}{'MB/cpu-s':>10}{'dropped':>9}")
    total_s, total_mb = 0.0, sum(len(d["content"].encode()) for d in docs) / 1e6
    for step in clean_steps(params):
        mb = sum(len(d["content"].encode()) for d in docs) / 1e6
        t0 = time.process_time()
        out = [step.process(d) for d in docs]
        dt = time.process_time() - t0
        total_s += dt
        kept = [o for o in out if not isinstance(o, tuple)]
        print(f"  {step.name:<22}{len(docs):>7}{mb:>9.2f}{dt:>9.3f}{mb / dt if dt else float('inf'):>10.1f}"
              f"{len(docs) - len(kept):>9}")
        docs = kept
    print(f"  {'all steps':<22}{'':>7}{total_mb:>9.2f}{total_s:>9.3f}{total_mb / total_s:>10.1f}")


# ------------------------------------------------------------------------------------------ dedup
def ours(texts: list[str], ids: list[str], cfg: DedupConfig, seed: int, workers: int | None) -> np.ndarray:
    """Near dedup, text → cluster label (the index of the kept document), as the stage runs it."""
    spec = SignatureSpec.from_config(cfg, seed)
    sigs, has = compute_signatures(texts, spec, workers)
    return near_duplicates(sigs, has, ids, cfg).keep_of


def datasketch_baseline(texts: list[str], ids: list[str], cfg: DedupConfig, seed: int,
                        params: tuple[int, int] | None) -> np.ndarray:
    """The same near dedup with datasketch: MinHash per document, MinHashLSH insert + query."""
    from datasketch import MinHash, MinHashLSH

    token = minhash.token_regex(cfg.token_pattern)
    lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm, params=params)
    sketches = []
    for i, text in enumerate(texts):
        toks = token.findall(text)
        n = min(cfg.ngram, len(toks))
        m = MinHash(num_perm=cfg.num_perm, seed=seed)
        if toks:
            m.update_batch([" ".join(toks[j:j + n]).encode() for j in range(len(toks) - n + 1)])
            lsh.insert(i, m)
        sketches.append(m if toks else None)
    edges = [(i, j) for i, m in enumerate(sketches) if m is not None for j in lsh.query(m) if j > i]
    labels = minhash.connected_components(len(texts), np.array(edges, dtype=np.int64).reshape(-1, 2))
    return minhash.representative(labels, ids)


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children (pool workers): robust to a loaded machine."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def timed(fn, *args, repeat: int = 1):
    """(best wall seconds, CPU seconds of that run, result)."""
    best, cpu, out = float("inf"), 0.0, None
    for _ in range(repeat):
        c0, t0 = cpu_seconds(), time.perf_counter()
        out = fn(*args)
        wall, used = time.perf_counter() - t0, cpu_seconds() - c0
        if wall < best:
            best, cpu = wall, used
    return best, cpu, out


def bench_dedup(params: Params, docs: list[dict], originals: int, repeat: int) -> list[str]:
    cfg, seed = params.data.dedup, params.seed
    bands, rows = banding(cfg)
    texts, ids = [d["content"] for d in docs], [d["id"] for d in docs]
    mb = sum(len(t.encode()) for t in texts) / 1e6
    labelled = build_neardup_set(n_originals=originals, n_boilerplate=originals, seed=seed)
    lab_ids = [f"{i:06d}" for i in range(len(labelled.texts))]
    kinds = ", ".join(f"{k} {labelled.kinds.count(k)}" for k in dict.fromkeys(labelled.kinds))
    lines = [f"near dedup, {len(texts)} documents / {mb:.1f} MB; ngram {cfg.ngram}, num_perm {cfg.num_perm}, "
             f"threshold {cfg.threshold}; labelled set {len(labelled.texts)} documents ({kinds})",
             f"  {'method':<44}{'bands x rows':>13}{'wall s':>8}{'CPU s':>8}{'MB/s':>8}{'removed':>9}{'F1':>8}"
             f"{'P':>7}{'R':>7}"]
    runs = [
        (f"ours, {os.cpu_count()} workers, verified", lambda t, i: ours(t, i, cfg, seed, None), (bands, rows)),
        ("ours, 1 worker, verified", lambda t, i: ours(t, i, cfg, seed, 1), (bands, rows)),
        ("datasketch MinHashLSH, default banding", lambda t, i: datasketch_baseline(t, i, cfg, seed, None),
         minhash.optimal_bands(cfg.threshold, cfg.num_perm, 0.5, 0.5)),
        ("datasketch MinHashLSH, our banding", lambda t, i: datasketch_baseline(t, i, cfg, seed, (bands, rows)),
         (bands, rows)),
    ]
    wall, cpu = {}, {}
    for name, fn, (b, r) in runs:
        wall[name], cpu[name], keep = timed(fn, texts, ids, repeat=repeat)
        scores = pairwise_scores(fn(labelled.texts, lab_ids).tolist(), labelled.groups)
        removed = int((keep != np.arange(len(keep))).sum())
        lines.append(f"  {name:<44}{f'{b} x {r}':>13}{wall[name]:>8.2f}{cpu[name]:>8.2f}{mb / wall[name]:>8.1f}"
                     f"{removed:>9}{scores['f1']:>8.4f}{scores['precision']:>7.3f}{scores['recall']:>7.3f}")
    par, one = runs[0][0], runs[1][0]
    for name, _, _ in runs[2:]:
        lines.append(f"  vs {name}: ours {os.cpu_count()} workers {wall[name] / wall[par]:.1f}x faster (wall); "
                     f"ours 1 worker {wall[name] / wall[one]:.1f}x (wall), {cpu[name] / cpu[one]:.1f}x (CPU)")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=str(REPO / "params.yaml"))
    ap.add_argument("--originals", type=int, default=60, help="originals (and boilerplate files) in the labelled set")
    ap.add_argument("--repeat", type=int, default=1, help="timing repeats (best of)")
    ap.add_argument("--skip-clean", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("OWNLLM_WANDB_MODE", "disabled")
    params = load_params(args.params)
    raw = Path(params.data.ingest.out)
    if not any(raw.glob("lang=*/*.parquet")):
        print(f"{raw} is empty: running `ownllm data ingest` first", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pipeline.cli", "data", "ingest", "--params", args.params], check=True)
    docs = read_docs(raw).to_pylist()
    print(f"corpus: {len(docs)} documents, {sum(d['size_bytes'] for d in docs) / 1e6:.1f} MB from {raw}; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    if not args.skip_clean:
        bench_clean(params, docs)
    print()
    print("\n".join(bench_dedup(params, docs, args.originals, args.repeat)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
