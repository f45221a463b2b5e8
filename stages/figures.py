"""Static PNG figures for the evaluate stage: readable without a browser or DVC."""

import matplotlib

matplotlib.use("Agg")  # headless: CI runners and servers have no display
import matplotlib.pyplot as plt
import numpy as np


def save(fig, path):
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def confusion_heatmap(matrix, classes, path):
    """matrix: (classes, classes) counts, rows = actual, columns = predicted."""
    side = max(6, 0.5 * len(classes))
    fig, ax = plt.subplots(figsize=(side + 1, side))
    # Log-ish colour scale so that the few errors stand out against the big diagonal.
    im = ax.imshow(np.log1p(matrix), cmap="Blues")
    for (i, j), count in np.ndenumerate(matrix):
        if count:
            colour = "white" if matrix[i, j] > matrix.max() / 2 else "black"
            ax.text(j, i, str(count), ha="center", va="center", fontsize=8, color=colour)
    ticks = range(len(classes))
    ax.set(xticks=ticks, yticks=ticks, xlabel="predicted", ylabel="actual")
    ax.set_xticklabels(classes, rotation=90 if max(map(len, classes)) > 2 else 0)
    ax.set_yticklabels(classes)
    ax.set_title(f"Confusion matrix: {int(np.trace(matrix))}/{int(matrix.sum())} correct")
    fig.colorbar(im, ax=ax, label="log(1 + count)")
    save(fig, path)


def training_curves(history, path):
    """history: DataFrame indexed by epoch (1-based) with loss/accuracy and optional val_*."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=False):
        for column, label in ((metric, "training"), (f"val_{metric}", "validation")):
            if column in history:
                ax.plot(history.index, history[column], marker="o", label=label)
        ax.set(xlabel="epoch", ylabel=metric, title=metric)
        ax.grid(alpha=0.3)
        ax.legend()
    save(fig, path)


def error_gallery(images, actual, predicted, confidence, path):
    """images: (K, height, width, 1 or 3) in [0, 1], the misclassified images, most
    confident first; actual, predicted: their class names."""
    k = len(images)
    cols = min(8, max(k, 1))
    rows = max(1, int(np.ceil(k / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, a, p, c in zip(axes.flat, images, actual, predicted, confidence, strict=False):
        if image.shape[-1] == 1:
            ax.imshow(image[..., 0], cmap="gray_r", vmin=0, vmax=1)
        else:
            ax.imshow(image)
        ax.set_title(f"true {a}, pred {p}\n{c:.1%}", fontsize=8)
    fig.suptitle("Most confident mistakes" if k else "No mistakes", fontsize=10)
    save(fig, path)
