"""`ownllm data stats`: the data "X-ray" — what is in the final dataset and what was dropped where.

Per language and per source: documents, bytes and lines, and p50/p90/p99/max of file size, average and
maximum line length and alphanumeric fraction; the document count after every stage; rejections per
stage and reason. Written as ``reports/data/stats.json`` (a DVC metrics file: sorted keys, rounded
floats, nothing that changes between identical runs), ``reports/data/rejections.csv`` (for
``dvc plots``) and PNG plots under ``reports/data/plots/`` that are byte-identical on rerun.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import Params, StatsConfig
from pipeline.data.records import read_docs

STAGE = "data stats"
# Columns described by distributions; content is never read.
DIST_COLUMNS = {"size_bytes": "file_size_bytes", "avg_line_len": "avg_line_len",
                "max_line_len": "max_line_len", "alnum_frac": "alnum_frac"}
READ_COLUMNS = ["lang", "source", "size_bytes", "num_lines", "avg_line_len", "max_line_len", "alnum_frac"]
DIGITS = 4  # floats are rounded so the metrics file reads well and diffs stay meaningful


def distribution(values: np.ndarray, percentiles: list[float]) -> dict[str, float]:
    """p<k> for each requested percentile plus max (linear interpolation, numpy's default)."""
    if len(values) == 0:
        return {}
    qs = np.percentile(values, percentiles)
    out = {f"p{p:g}": round(float(q), DIGITS) for p, q in zip(percentiles, qs)}
    out["max"] = round(float(values.max()), DIGITS)
    return out


def summarise(table: pa.Table, percentiles: list[float]) -> dict:
    """Counts and distributions of one slice of the dataset."""
    cols = {name: table.column(name).to_numpy() for name in DIST_COLUMNS}
    return {
        "documents": table.num_rows,
        "bytes": int(cols["size_bytes"].sum()),
        "lines": int(table.column("num_lines").to_numpy().sum()),
        **{label: distribution(cols[name], percentiles) for name, label in DIST_COLUMNS.items()},
    }


def group_summaries(table: pa.Table, key: str, percentiles: list[float]) -> dict[str, dict]:
    values = table.column(key).to_pylist()
    out = {}
    for value in sorted(set(values)):
        mask = pa.array([v == value for v in values])
        out[value] = summarise(table.filter(mask), percentiles)
    return out


def funnel(stages: dict[str, str]) -> dict[str, dict]:
    """Documents per language after each stage whose dataset exists (missing ones are left out)."""
    out = {}
    for stage, path in stages.items():
        try:
            langs = read_docs(path, columns=["lang"]).column("lang").to_pylist()
        except FileNotFoundError:
            continue
        counts = {lang: langs.count(lang) for lang in sorted(set(langs))}
        out[stage] = {"documents": len(langs), "by_lang": counts}
    return out


def rejection_counts(dirs: list[str]) -> dict[str, dict]:
    """``{stage: {"total": n, "by_reason": {reason: n}, "by_lang": {lang: n}}}`` over the rejected dirs.

    A directory that does not exist (its stage has not run, or rejects nothing) counts as empty.
    """
    files = [Path(d) / "rejected.parquet" for d in dirs]
    tables = [pq.read_table(f, columns=["stage", "reason", "lang"]) for f in files if f.is_file()]
    rej = pa.concat_tables(tables).to_pylist() if tables else []
    out: dict[str, dict] = {}
    for row in rej:
        s = out.setdefault(row["stage"], {"total": 0, "by_reason": {}, "by_lang": {}})
        s["total"] += 1
        s["by_reason"][row["reason"]] = s["by_reason"].get(row["reason"], 0) + 1
        lang = row["lang"] or "unknown"
        s["by_lang"][lang] = s["by_lang"].get(lang, 0) + 1
    return out


def compute_stats(cfg: StatsConfig) -> tuple[dict, pa.Table]:
    table = read_docs(cfg.input, columns=READ_COLUMNS)
    stats = {
        "total": summarise(table, cfg.percentiles),
        "by_lang": group_summaries(table, "lang", cfg.percentiles),
        "by_source": group_summaries(table, "source", cfg.percentiles),
        "funnel": funnel(cfg.funnel),
        "rejected": rejection_counts(cfg.rejected),
    }
    return stats, table


def write_rejections_csv(rejected: dict[str, dict], path: Path) -> Path:
    """One row per (stage, reason): the table ``dvc plots`` draws as a bar chart."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["reason", "count"])
        for stage in sorted(rejected):
            for reason, count in sorted(rejected[stage]["by_reason"].items()):
                w.writerow([f"{stage}/{reason}", count])
    return path


def run_stats(params: Params) -> dict:
    from pipeline.data.stats_plots import write_plots
    from pipeline.tracking import write_json

    cfg = params.data.stats
    stats, table = compute_stats(cfg)
    out = Path(cfg.out)
    write_json(out / "stats.json", stats)
    write_rejections_csv(stats["rejected"], out / "rejections.csv")
    if cfg.plots:
        write_plots(table, stats, out / "plots", cfg.plot_dpi)
    return stats


def main(args) -> int:
    from pipeline.config import load_params
    from pipeline.tracking import say, stage_run

    params = load_params(args.params)
    # stats.json is this stage's metrics file; the tracking one would only duplicate it.
    with stage_run("data_stats", params, write_metrics=False) as run:
        try:
            stats = run_stats(params)
        except FileNotFoundError as exc:
            from pipeline.cli import UserError

            raise UserError(str(exc)) from None
        run.summary({"total": stats["total"], "funnel": stats["funnel"]})
    t = stats["total"]
    langs = ", ".join(f"{k} {v['documents']}" for k, v in stats["by_lang"].items())
    rejected = sum(s["total"] for s in stats["rejected"].values())
    say(f"[stats] {t['documents']} documents, {t['bytes'] / 1e6:.1f} MB, {t['lines']} lines ({langs}); "
        f"{rejected} rejected in all; report in {params.data.stats.out}/stats.json")
    return 0
