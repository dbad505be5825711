"""The report's figures (matplotlib, headless): grouped bars, learning curves."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: DVC stages, flows, CI
import matplotlib.pyplot as plt  # noqa: E402


def clear(out: Path, figures: dict[str, str]) -> None:
    """Remove a report's earlier figures before drawing: one this run has no figures for (a `--methods` subset
    run, say) is then absent rather than a stale picture of other runs."""
    for name in figures:
        (out / name).unlink(missing_ok=True)


def section(out: Path, figures: dict[str, str]) -> list[str]:
    """REPORT.md's figure links (file name -> caption), for the figures this run drew."""
    return ["## Figures", ""] + [line for name, caption in figures.items() if (out / name).exists()
                                 for line in (f"![{caption}]({name})", "")]


def grouped_bars(path: Path, labels: list[str], series: dict[str, list[float]], ylabel: str, title: str,
                 errors: dict[str, list[float]] | None = None) -> Path:
    """One group of bars per label, one bar per series (e.g. per relation: manual vs P-tuning)."""
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.32 * len(labels) * max(len(series), 1) + 2), 4.2))
    for i, (name, values) in enumerate(series.items()):
        xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(labels))]
        ax.bar(xs, values, width, label=name, yerr=(errors or {}).get(name), capsize=2)
    ax.set_xticks(range(len(labels)), labels, rotation=60 if len(labels) > 8 else 0, ha="right" if len(labels) > 8 else "center", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def curves(path: Path, lines: dict[str, list[tuple[int, float]]], xlabel: str, ylabel: str, title: str,
           mean_label: str | None = None) -> Path:
    """Thin lines per key (e.g. per relation), and their mean at each x shared by all when `mean_label`."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, points in lines.items():
        if points:
            ax.plot(*zip(*points), lw=0.8, alpha=0.45)
    if mean_label and lines:
        common = sorted(set.intersection(*(set(x for x, _ in p) for p in lines.values() if p)))
        by_x = [sum(dict(p)[x] for p in lines.values()) / len(lines) for x in common]
        ax.plot(common, by_x, lw=2.5, color="black", label=mean_label)
        ax.legend(fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
