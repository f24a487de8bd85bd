"""Local engine vs Spark (local[2]) on the embedded corpus, and a dedup scaling run on synthetic growth.

    python benchmarks/bench_spark.py                      # both parts; plot in docs/spark_scaling.png
    python benchmarks/bench_spark.py --scales 1 4 --base-docs 200 --skip-embedded

Part 1 runs ingest, clean and dedup of params.yaml's sources under each engine and checks that the
kept and rejected ids agree; Spark's session start-up is timed on its own. Part 2 grows a sample of the
cleaned corpus to 1x, 4x, 16x: every copy is the original with seeded mutations (lines dropped,
duplicated or edited), so most copies are near duplicates of their original and dedup has real
clusters to find; it times dedup under both engines at each size.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("OWNLLM_WANDB_MODE", "disabled")

import pyarrow as pa  # noqa: E402

from pipeline.config import load_params, parse_params  # noqa: E402
from pipeline.data import dedup, spark_dedup, spark_io  # noqa: E402
from pipeline.data.engine import LocalEngine  # noqa: E402
from pipeline.data.spark_engine import SparkEngine  # noqa: E402
from pipeline.data.records import CLEAN_SCHEMA, make_doc, read_docs, read_rejected, write_docs  # noqa: E402


def with_dirs(params, root: Path, engine: str, dedup_input: Path | None = None):
    """params.yaml with every data path under ``root`` and the given engine."""
    data = params.model_dump(mode="json", exclude={"source_file"})
    data["engine"] = engine
    d = data["data"]
    for stage in ("ingest", "clean", "dedup"):
        d[stage]["out"] = str(root / stage)
        d[stage]["rejected"] = str(root / "rejected" / stage)
    d["dedup"]["input"] = str(dedup_input or root / "clean")
    data["tracking"]["reports_dir"] = str(root / "reports")
    data["spark"]["conf"] = {**data["spark"]["conf"], "spark.ui.showConsoleProgress": "false"}
    return parse_params(data)


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def outcome(root: Path) -> tuple[list[str], list[tuple]]:
    rej = read_rejected(root / "rejected")
    return (read_docs(root / "dedup", columns=["id"])["id"].to_pylist(),
            sorted(zip(rej["id"].to_pylist(), rej["reason"].to_pylist(), rej["detail"].to_pylist())))


# ----------------------------------------------------------------------------------- embedded corpus
def embedded(params, work: Path, spark) -> dict:
    times = {}
    for engine in ("local", "spark"):
        p = with_dirs(params, work / engine, engine)
        runner = LocalEngine(p.workers) if engine == "local" else SparkEngine(p, spark)
        for stage in ("ingest", "clean", "dedup"):
            _, times[(engine, stage)] = timed(getattr(runner, stage), p)
    same = outcome(work / "local") == outcome(work / "spark")
    docs = read_docs(work / "local" / "ingest", columns=["id"]).num_rows
    return {"times": times, "identical": same, "documents": docs}


# ------------------------------------------------------------------------------------------- scaling
def mutate(text: str, rng: random.Random) -> str:
    """A plausible fork of a file: a few lines dropped, duplicated or edited."""
    lines = text.splitlines()
    out = []
    for line in lines:
        r = rng.random()
        if r < 0.03:
            continue
        if r < 0.06:
            out += [line, line]
        elif r < 0.12:
            out.append(f"{line}  # local change {rng.randrange(1000)}")
        else:
            out.append(line)
    return "\n".join(out) + "\n"


def grow(base: pa.Table, factor: int, seed: int) -> pa.Table:
    """``factor`` copies of ``base``: the originals, then mutated forks under new paths (new ids)."""
    rows = base.to_pylist()
    out = list(rows)
    for copy in range(1, factor):
        for i, row in enumerate(rows):
            rng = random.Random(f"{seed}/{copy}/{i}")
            doc = make_doc(row["source"], f"fork{copy}/{row['path']}", row["lang"], mutate(row["content"], rng))
            out.append({**doc, "pii_redactions": row["pii_redactions"]})
    return pa.Table.from_pylist(out, schema=CLEAN_SCHEMA)


def scaling(params, clean_dir: Path, work: Path, spark, scales: list[int], base_docs: int) -> list[dict]:
    table = read_docs(clean_dir)
    # An even sample across languages, by id (deterministic).
    step = max(1, table.num_rows // base_docs)
    base = table.take(list(range(0, table.num_rows, step))[:base_docs])
    results = []
    for factor in scales:
        data_dir = work / f"x{factor}" / "input"
        write_docs(grow(base, factor, params.seed), data_dir)
        row = {"factor": factor, "documents": base.num_rows * factor}
        for engine in ("local", "spark"):
            p = with_dirs(params, work / f"x{factor}" / engine, engine, dedup_input=data_dir)
            fn, args = (dedup.run_dedup, (p,)) if engine == "local" else (spark_dedup.run_dedup_spark, (p, spark))
            metrics, row[engine] = timed(fn, *args)
            row["removed"] = metrics["exact_duplicates"] + metrics["near_duplicates"]
        row["identical"] = outcome(work / f"x{factor}" / "local") == outcome(work / f"x{factor}" / "spark")
        results.append(row)
        print(f"  x{factor:<3} {row['documents']:>6} docs  local {row['local']:6.1f}s  spark {row['spark']:6.1f}s  "
              f"removed {row['removed']}  identical={row['identical']}", flush=True)
    return results


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    docs = [r["documents"] for r in results]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(docs, [r["spark"] for r in results], "o-", label="Spark local[2]")
    ax.plot(docs, [r["local"] for r in results], "s-", label="local engine")
    if len(results) > 1:  # time = fixed cost + per-document cost, least squares: linear growth is a line
        import numpy as np

        per_doc, fixed = np.polyfit(docs, [r["spark"] for r in results], 1)
        ax.plot(docs, [fixed + per_doc * d for d in docs], "k:",
                label=f"fit: {fixed:.0f}s + {per_doc * 1000:.1f}ms/doc (Spark)")
    ax.set_xlabel("documents (1x, 4x, 16x synthetic growth)")
    ax.set_ylabel("dedup wall time (s)")
    ax.set_title("Near-dedup scaling, 2 shared CPU cores")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=str(REPO / "params.yaml"))
    ap.add_argument("--scales", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--base-docs", type=int, default=150)
    ap.add_argument("--skip-embedded", action="store_true")
    ap.add_argument("--plot", default=str(REPO / "docs" / "spark_scaling.png"))
    args = ap.parse_args()
    params = load_params(args.params)
    work = Path(tempfile.mkdtemp(prefix="bench_spark_"))
    try:
        _, startup = timed(lambda: spark_io.spark_session(params).range(1).count())
        spark = spark_io.spark_session(params)
        print(f"spark session start-up ({params.spark.master}): {startup:.1f}s", flush=True)
        if args.skip_embedded:
            p = with_dirs(params, work / "embedded", "local")
            local = LocalEngine(p.workers)
            local.ingest(p)
            local.clean(p)
        else:
            res = embedded(params, work / "embedded", spark)
            print(f"embedded corpus: {res['documents']} documents; identical results: {res['identical']}")
            for stage in ("ingest", "clean", "dedup"):
                lo, sp = res["times"][("local", stage)], res["times"][("spark", stage)]
                print(f"  {stage:<7} local {lo:6.1f}s   spark {sp:6.1f}s   spark/local {sp / lo:5.2f}x")
            lo = sum(v for (e, _), v in res["times"].items() if e == "local")
            sp = sum(v for (e, _), v in res["times"].items() if e == "spark")
            print(f"  total   local {lo:6.1f}s   spark {sp:6.1f}s   spark/local {sp / lo:5.2f}x (start-up excluded)")
        clean_dir = work / "embedded" / "local" / "clean"
        print(f"dedup scaling (base sample {args.base_docs} cleaned documents):", flush=True)
        results = scaling(params, clean_dir, work / "scaling", spark, args.scales, args.base_docs)
        first = results[0]
        for r in results[1:]:
            growth = r["documents"] / first["documents"]
            print(f"  x{r['factor']}: data x{growth:.0f}, spark time x{r['spark'] / first['spark']:.2f}, "
                  f"local time x{r['local'] / first['local']:.2f}")
        plot(results, Path(args.plot))
        print(f"plot: {args.plot}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
