"""The report's figures (matplotlib, headless): grouped bars, horizontal bars per item, learning curves."""
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


def grouped_bars(path: Path, labels: list[str], series: dict[str, list[float | None]], ylabel: str, title: str,
                 errors: dict[str, list[float]] | None = None, apart_from: int | None = None, apart_note: str = "") -> Path:
    """One group of bars per label, one bar per series (e.g. per method: ours and the paper's; None: no bar).
    `apart_from`: the labels from that index on are set apart by a dashed line and `apart_note` (e.g. methods
    averaged over fewer relations, not comparable with the rest)."""
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.32 * len(labels) * max(len(series), 1) + 2), 4.2))
    for i, (name, values) in enumerate(series.items()):
        xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(labels))]
        shown = [(x, v, e) for x, v, e in zip(xs, values, (errors or {}).get(name) or [0.0] * len(values)) if v is not None]
        ax.bar([x for x, _, _ in shown], [v for _, v, _ in shown], width, label=name,
               yerr=[e for _, _, e in shown] if (errors or {}).get(name) else None, capsize=2)
    if apart_from is not None and 0 < apart_from < len(labels):
        ax.axvline(apart_from - 0.5, color="grey", ls="--", lw=1)
        ax.text(apart_from - 0.4, ax.get_ylim()[1] * 0.95, apart_note, fontsize=8, va="top", color="grey")
    ax.set_xticks(range(len(labels)), labels, rotation=60 if len(labels) > 8 else 0, ha="right" if len(labels) > 8 else "center", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def horizontal_bars(path: Path, labels: list[str], series: dict[str, list[float]], xlabel: str, title: str,
                    marker: tuple[str, list[float]] | None = None) -> Path:
    """One row per label, top to bottom in the given order, a bar per series side by side, and `marker` (name,
    values) as a black tick on each row (e.g. a floor): 41 relations stay readable on a screen."""
    height = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(7.5, max(3.0, 0.26 * len(labels) * max(len(series), 1) / 2 + 1.2)))
    rows = range(len(labels))
    for i, (name, values) in enumerate(series.items()):
        ax.barh([y + (i - (len(series) - 1) / 2) * height for y in rows], values, height, label=name)
    if marker is not None:
        ax.scatter(marker[1], list(rows), marker="|", s=160, color="black", zorder=3, label=marker[0])
    ax.set_yticks(list(rows), labels, fontsize=8)
    ax.invert_yaxis()  # the first label on top
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


MAX_NAMED_LINES = 10  # more lines than this are not told apart by colour: the legend then names the mean only


def curves(path: Path, lines: dict[str, list[tuple[int, float]]], xlabel: str, ylabel: str, title: str,
           mean_label: str | None = None) -> Path:
    """A line per key (e.g. per relation), and their mean at each x shared by all when `mean_label`. A few lines
    (SuperGLUE's tasks) are each named in the legend; many (LAMA's 41 relations) are thin and unnamed."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    named = len(lines) <= MAX_NAMED_LINES
    for name, points in lines.items():
        if points:
            ax.plot(*zip(*points), marker="o" if named else None, ms=3, lw=1.2 if named else 0.8,
                    alpha=0.9 if named else 0.45, label=name if named else None)
    if mean_label and lines:
        common = sorted(set.intersection(*(set(x for x, _ in p) for p in lines.values() if p)))
        by_x = [sum(dict(p)[x] for p in lines.values()) / len(lines) for x in common]
        ax.plot(common, by_x, lw=2.5, color="black", label=mean_label)
    if named or mean_label:
        ax.legend(fontsize=8, ncol=2 if named else 1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
