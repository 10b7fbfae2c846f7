"""PNG plots for the report (:mod:`curate.plotting`: matplotlib, Agg backend, no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from curate.plotting import pyplot, save_png

COLORS = {"selected": "#1b7837", "not_selected": "#9e9e9e", "filtered": "#e08214", "quarantined": "#b2182b"}




def outcomes_bar(counts: dict[str, int], path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 2.6))
    names = list(counts)
    ax.barh(names, [counts[n] for n in names], color=[COLORS.get(n, "#4393c3") for n in names])
    for i, n in enumerate(names):
        ax.text(counts[n], i, f" {counts[n]}", va="center")
    ax.invert_yaxis()
    ax.set_xlabel("input rows")
    ax.set_title("Where every input row ended")
    ax.spines[["top", "right"]].set_visible(False)
    return save_png(fig, path)


def score_histogram(name: str, values: np.ndarray, selected: np.ndarray, path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3))
    finite = ~np.isnan(values)
    v = values[finite]
    bins = np.histogram_bin_edges(v, bins=40) if len(v) and np.ptp(v) > 0 else 10
    ax.hist(v, bins=bins, color=COLORS["not_selected"], label=f"candidates ({finite.sum()})")
    ax.hist(values[finite & selected], bins=bins, color=COLORS["selected"], alpha=0.85, label=f"selected ({(finite & selected).sum()})")
    ax.set_title(name)
    ax.set_ylabel("rows")
    ax.legend(frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return save_png(fig, path)


def pca_2d(X: np.ndarray) -> np.ndarray:
    """Project rows onto the first two principal components (deterministic sign)."""
    Xc = X - X.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(Xc, full_matrices=False)
    comps = vt[:2]
    comps *= np.sign(comps[:, [int(np.argmax(np.abs(c))) for c in comps]].diagonal())[:, None]
    return Xc @ comps.T


def embedding_map_by(xy: np.ndarray, labels: list[str], path: Path, title: str, max_labels: int = 10) -> Path:
    """The PCA map with points coloured by a category (source, outcome); categories past the
    ``max_labels`` most frequent are drawn together as "other". ``xy``: the rows' :func:`pca_2d`."""
    from collections import Counter

    plt = pyplot()
    top = [c for c, _ in Counter(labels).most_common(max_labels)]
    names = [lab if lab in top else "other" for lab in labels]
    fig, ax = plt.subplots(figsize=(6, 5))
    cmap = plt.get_cmap("tab10")
    for i, cat in enumerate([*top, "other"]):
        m = np.array([n == cat for n in names])
        if m.any():
            ax.scatter(xy[m, 0], xy[m, 1], s=8, color=COLORS.get(cat, cmap(i % 10)), alpha=0.7, label=f"{cat} ({int(m.sum())})",
                       linewidths=0)
    ax.set_title(title)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.legend(frameon=False, loc="best", fontsize=7)
    ax.spines[["top", "right"]].set_visible(False)
    return save_png(fig, path)


def embedding_map(xy: np.ndarray, selected: np.ndarray, path: Path, title: str) -> Path:
    """The PCA map (``xy``: the rows' :func:`pca_2d`), selected rows highlighted."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.scatter(xy[~selected, 0], xy[~selected, 1], s=6, c=COLORS["not_selected"], alpha=0.5, label=f"not selected ({(~selected).sum()})",
               linewidths=0)
    ax.scatter(xy[selected, 0], xy[selected, 1], s=12, c=COLORS["selected"], label=f"selected ({selected.sum()})", linewidths=0)
    ax.set_title(title)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.legend(frameon=False, loc="best")
    ax.spines[["top", "right"]].set_visible(False)
    return save_png(fig, path)
