"""PNG plots of the data stats, byte-identical on rerun.

matplotlib's Agg backend draws the same pixels for the same data, fonts and sizes; the only thing
that varies in a PNG is the ``Software`` text chunk (the matplotlib version), which we drop. Figures
have fixed sizes and DPI, languages a fixed order and colours, so a rerun writes the same bytes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

PNG_METADATA = {"Software": None}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, dpi: int) -> Path:
    fig.savefig(path, dpi=dpi, metadata=PNG_METADATA)
    _pyplot().close(fig)
    return path


def plot_distributions(table: pa.Table, path: Path, dpi: int) -> Path:
    """Per-language histograms of file size, line lengths and alphanumeric fraction (2 x 2)."""
    plt = _pyplot()
    langs = sorted(set(table.column("lang").to_pylist()))
    lang_col = np.array(table.column("lang").to_pylist(), dtype=object)
    panels = [
        ("size_bytes", "file size (bytes, log10)", True),
        ("avg_line_len", "average line length (chars, log10)", True),
        ("max_line_len", "maximum line length (chars, log10)", True),
        ("alnum_frac", "alphanumeric fraction", False),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (col, label, log) in zip(axes.flat, panels):
        values = table.column(col).to_numpy().astype(float)
        if log:
            values = np.log10(np.maximum(values, 1.0))
        lo, hi = (float(values.min()), float(values.max())) if len(values) else (0.0, 1.0)
        bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 41)
        for lang in langs:
            ax.hist(values[lang_col == lang], bins=bins, histtype="step", label=lang, linewidth=1.4)
        ax.set_xlabel(label)
        ax.set_ylabel("documents")
    if langs:
        axes.flat[0].legend(loc="upper right", fontsize=8)
    fig.suptitle(f"{table.num_rows} documents")
    fig.tight_layout()
    return _save(fig, path, dpi)


def plot_funnel(funnel: dict[str, dict], path: Path, dpi: int) -> Path:
    """Documents per language after each stage."""
    plt = _pyplot()
    stages = list(funnel)
    langs = sorted({lang for s in funnel.values() for lang in s["by_lang"]})
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / max(1, len(langs))
    x = np.arange(len(stages))
    for k, lang in enumerate(langs):
        ax.bar(x + k * width, [funnel[s]["by_lang"].get(lang, 0) for s in stages], width, label=lang)
    ax.set_xticks(x + width * (len(langs) - 1) / 2, stages)
    ax.set_ylabel("documents")
    ax.set_title("documents after each stage")
    if langs:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path, dpi)


def plot_rejections(rejected: dict[str, dict], path: Path, dpi: int) -> Path:
    """Rejected documents per stage and reason."""
    plt = _pyplot()
    labels, counts = [], []
    for stage in sorted(rejected):
        for reason, count in sorted(rejected[stage]["by_reason"].items()):
            labels.append(f"{stage}: {reason}")
            counts.append(count)
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.35 * max(1, len(labels))))
    y = np.arange(len(labels))
    ax.barh(y, counts, color="tab:red")
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    ax.set_xlabel("documents")
    ax.set_title("rejections per stage and reason" if labels else "no rejections")
    for yi, c in zip(y, counts):
        ax.annotate(str(c), (c, yi), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
    fig.tight_layout()
    return _save(fig, path, dpi)


def write_plots(table: pa.Table, stats: dict, out_dir: Path, dpi: int = 100) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    return [
        plot_distributions(table, out_dir / "distributions.png", dpi),
        plot_funnel(stats["funnel"], out_dir / "funnel.png", dpi),
        plot_rejections(stats["rejected"], out_dir / "rejections.png", dpi),
    ]
