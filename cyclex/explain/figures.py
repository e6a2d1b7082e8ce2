"""Seed-000 figures as PNG files (matplotlib, Agg backend): CPG histogram + CDF, hit-rate curves,
pixel ROC curves, threshold-IoU curves. Compute lives in `alignment` / `effectiveness`; these only draw.

Curves are passed as `{label: (x, y)}` (ROC: `{label: (fpr, tpr, auc)}`) so several sources
(counterfactual maps, eye tracking, two generators) share one plot. Each function writes `path`
atomically and returns it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from cyclex.atomic_io import atomic_write

__all__ = ["plot_cpg_distribution", "plot_hit_rate_curves", "plot_roc_curves", "plot_threshold_iou_curves"]


def _figure(ncols: int = 1):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(4.2 * ncols, 3.6), squeeze=False)
    return plt, fig, axes[0]


def _save(plt, fig, path: str | os.PathLike) -> Path:
    fig.tight_layout()
    try:
        return atomic_write(path, lambda handle: fig.savefig(handle, dpi=120, format="png"))
    finally:
        plt.close(fig)


def plot_cpg_distribution(cpg_values: Sequence[float], path: str | os.PathLike, threshold: float = 0.1,
                          title: str = "Counterfactual probability gain") -> Path:
    """Histogram (left) and empirical CDF (right) of CPG values, with the acceptance threshold."""
    values = np.asarray([v for v in cpg_values if np.isfinite(v)], dtype=np.float64)
    plt, fig, (hist_ax, cdf_ax) = _figure(2)
    if values.size:
        hist_ax.hist(values, bins=min(30, max(5, values.size // 2)), color="tab:blue", alpha=0.8)
        sorted_values = np.sort(values)
        cdf_ax.step(sorted_values, np.arange(1, values.size + 1) / values.size, where="post")
    for ax in (hist_ax, cdf_ax):
        ax.axvline(threshold, color="tab:red", linestyle="--", label=f"threshold {threshold:g}")
        ax.set_xlabel("CPG = logit(F) - logit(CF)")
    hist_ax.set_ylabel("counterfactuals")
    cdf_ax.set_ylabel("cumulative share")
    cdf_ax.set_ylim(0, 1.02)
    hist_ax.legend(fontsize=8)
    fig.suptitle(f"{title} (n = {values.size})", fontsize=10)
    return _save(plt, fig, path)


def _curves(curves: Mapping[str, tuple], path, xlabel: str, ylabel: str, title: str, diagonal: bool = False,
            with_auc: bool = False) -> Path:
    plt, fig, (ax,) = _figure(1)
    for label, curve in curves.items():
        x, y = np.asarray(curve[0], dtype=np.float64), np.asarray(curve[1], dtype=np.float64)
        if x.shape != y.shape:
            raise ValueError(f"curve {label!r}: x and y have shapes {x.shape} and {y.shape}")
        name = f"{label} (AUC {curve[2]:.3f})" if with_auc and len(curve) > 2 and np.isfinite(curve[2]) else label
        ax.plot(x, y, marker="." if x.size < 30 else None, label=name)
    if diagonal:
        ax.plot([0, 1], [0, 1], color="gray", linestyle=":", linewidth=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title, fontsize=10)
    if curves:
        ax.legend(fontsize=8)
    return _save(plt, fig, path)


def plot_hit_rate_curves(curves: Mapping[str, tuple], path: str | os.PathLike, title: str = "Hit rate") -> Path:
    """Hit rate against top-k percentile, one line per source: {label: (percentiles, rates)}."""
    return _curves(curves, path, "top-k percentile of map pixels (%)", "hit rate", title)


def plot_roc_curves(curves: Mapping[str, tuple], path: str | os.PathLike, title: str = "Pixel ROC") -> Path:
    """Pixel ROC curves: {label: (fpr, tpr, auc)}."""
    return _curves(curves, path, "false positive rate", "true positive rate", title, diagonal=True, with_auc=True)


def plot_threshold_iou_curves(curves: Mapping[str, tuple], path: str | os.PathLike,
                              title: str = "Threshold-IoU") -> Path:
    """IoU against intensity threshold: {label: (thresholds, ious[, auc_iou])}."""
    return _curves(curves, path, "threshold on normalised map", "IoU", title, with_auc=True)
