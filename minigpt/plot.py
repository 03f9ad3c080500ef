"""Pictures written to files with matplotlib (no display needed)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch
    from matplotlib import pyplot
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.image import AxesImage


def _pyplot() -> pyplot:
    # Imported on first plot, not with the package: matplotlib is slow to import.
    # "Agg" draws into files only, so plotting works without a display.
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot


def plot_losses(epochs_seen: Sequence[float], tokens_seen: Sequence[int], train_losses: Sequence[float],
                val_losses: Sequence[float], path: str | os.PathLike = "loss-plot.png") -> Path:
    """Training and validation loss against epochs, with tokens seen on a second x-axis."""
    fig, ax1 = _pyplot().subplots(figsize=(5, 3))
    ax1.plot(epochs_seen, train_losses, label="Training loss")
    if any(v == v for v in val_losses):  # a run without validation has only NaNs here
        ax1.plot(epochs_seen, val_losses, linestyle="-.", label="Validation loss")
    ax1.set_xlabel("Epochs")
    ax1.set_ylabel("Loss")
    ax1.legend(loc="upper right")
    ax2 = ax1.twiny()  # shares the y-axis; an invisible line aligns its ticks with tokens seen
    ax2.plot(tokens_seen, train_losses, alpha=0)
    ax2.set_xlabel("Tokens seen")
    fig.tight_layout()
    return _save_figure(fig, path)


def _save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    _pyplot().close(fig)
    return path


def plot_classification(history: dict[str, list], path: str | os.PathLike) -> Path:
    """Classifier training and validation loss (left) and accuracy (right) against epochs."""
    fig, axes = _pyplot().subplots(1, 2, figsize=(9, 3))
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
        ax.plot(history["epoch"], history[f"train_{metric}"], label=f"Training {metric}")
        ax.plot(history["epoch"], history[f"val_{metric}"], linestyle="-.", label=f"Validation {metric}")
        ax.set_xlabel("Epochs")
        ax.set_ylabel(metric.capitalize())
        ax.legend()
    fig.tight_layout()
    return _save_figure(fig, path)


# Beyond this many tokens the tick labels overlap into a black smear; the heatmap alone still reads.
_MAX_LABELLED_TOKENS = 64


def _as_array(weights: torch.Tensor | np.ndarray) -> np.ndarray:
    # Tensors may be bfloat16 or on a GPU; matplotlib wants float arrays in memory.
    if hasattr(weights, "detach"):
        weights = weights.detach().float().cpu().numpy()
    return np.asarray(weights)


def _draw_attention(ax: Axes, weights: np.ndarray, tokens: Sequence[str], x_labels: bool = True,
                    y_labels: bool = True) -> AxesImage:
    """One (queries x keys) heatmap: row i is how token i spreads its attention over tokens 0..i."""
    image = ax.imshow(weights, cmap="viridis", vmin=0.0, vmax=1.0)
    labels = list(tokens) if len(tokens) <= _MAX_LABELLED_TOKENS else []
    blank = [""] * len(labels)
    ax.set_xticks(range(len(labels)), labels if x_labels else blank, rotation=90, fontsize=7)
    ax.set_yticks(range(len(labels)), labels if y_labels else blank, fontsize=7)
    return image


def plot_attention(weights: torch.Tensor | np.ndarray, tokens: Sequence[str], path: str | os.PathLike,
                   title: str | None = None) -> Path:
    """Heatmap of one head's (tokens, tokens) attention weights: keys on x, queries on y."""
    weights = _as_array(weights)
    n = len(tokens)
    if weights.shape != (n, n):
        raise ValueError(f"expected ({n}, {n}) attention weights for {n} tokens, got shape {weights.shape}")
    side = min(16.0, max(4.0, 0.3 * n + 2))
    fig, ax = _pyplot().subplots(figsize=(side + 1, side), layout="constrained")
    image = _draw_attention(ax, weights, tokens)
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query (attending)")
    if title:
        ax.set_title(title)
    fig.colorbar(image, ax=ax, shrink=0.8)
    return _save_figure(fig, path)


def plot_attention_grid(weights: torch.Tensor | np.ndarray, tokens: Sequence[str],
                        path: str | os.PathLike, title: str | None = None) -> Path:
    """Every head of one layer, (heads, tokens, tokens), as a grid of heatmaps."""
    weights = _as_array(weights)
    n = len(tokens)
    if weights.ndim != 3 or weights.shape[1:] != (n, n):
        raise ValueError(f"expected (heads, {n}, {n}) attention weights for {n} tokens, "
                         f"got shape {weights.shape}")
    n_heads = weights.shape[0]
    cols = math.ceil(math.sqrt(n_heads))
    rows = math.ceil(n_heads / cols)
    cell = min(6.0, max(2.5, 0.2 * n + 1))
    fig, axes = _pyplot().subplots(rows, cols, figsize=(cell * cols, cell * rows), squeeze=False,
                             layout="constrained")
    for i, ax in enumerate(axes.flat):
        if i >= n_heads:
            ax.axis("off")
            continue
        # Token labels only along the grid's outer edges, so the cells stay readable.
        image = _draw_attention(ax, weights[i], tokens, x_labels=i >= n_heads - cols, y_labels=i % cols == 0)
        ax.set_title(f"head {i}", fontsize=9)
    fig.colorbar(image, ax=axes, shrink=0.6)
    if title:
        fig.suptitle(title)
    return _save_figure(fig, path)
