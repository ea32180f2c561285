"""Pictures people look at: colour palettes, segmentation overlays, confusion-matrix plots."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np


# zlib level of the picture grids (overlays, hierarchies): photographs compress little, and PIL's default
# (6) spent most of an evaluation's picture time encoding them; level 1 is ~3x faster, files ~15 % larger.
GRID_PNG = {"compress_level": 1}


def palette(n: int) -> np.ndarray:
    """``(n, 3)`` uint8 distinct colours (golden-ratio hues, fixed lightness); deterministic."""
    import colorsys

    cols = [colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.65 + 0.35 * (i % 2), 0.95 - 0.3 * (i % 3 == 2))
            for i in range(n)]
    return (np.array(cols) * 255).astype(np.uint8).reshape(n, 3)


def colorize(labels: np.ndarray, n: int) -> np.ndarray:
    """(H, W) int labels (−1 = ignore, drawn black) -> (H, W, 3) uint8."""
    pal = np.concatenate([palette(max(n, 1)), np.zeros((1, 3), np.uint8)])
    idx = np.where((labels >= 0) & (labels < n), labels, n)
    return pal[idx]


# Pixels per band of :func:`overlay`'s float32 blend: its temporaries stay small for any image size.
BAND_PIXELS = 1 << 20
# Long side of the examples kept for the evaluation's pictures (a grid panel is ~300 px wide).
THUMBNAIL_SIDE = 1024


def overlay(image: np.ndarray, labels: np.ndarray, n: int, alpha: float = 0.55) -> np.ndarray:
    """Colour labels blended over the image (both (H, W[, 3])), one band of rows at a time."""
    out = np.empty(labels.shape + (3,), np.uint8)
    step = max(1, BAND_PIXELS // max(1, labels.shape[1]))
    for r0 in range(0, labels.shape[0], step):
        col = colorize(labels[r0:r0 + step], n).astype(np.float32)
        blend = alpha * col + (1 - alpha) * image[r0:r0 + step].astype(np.float32)
        out[r0:r0 + step] = blend.clip(0, 255).astype(np.uint8)
    return out


def thumbnail(array: np.ndarray, max_side: int = THUMBNAIL_SIDE) -> np.ndarray:
    """(H, W[, C]) at most ``max_side`` on its long side: every s-th pixel (nearest neighbour, so labels
    stay labels), a copy; an array already that small is returned as it is."""
    s = -(-max(array.shape[:2]) // max_side)  # ceil
    return array if s <= 1 else np.ascontiguousarray(array[::s, ::s])


def save_png(path: str | Path, array: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(array).save(path)


def overlay_grid(path: str | Path, rows: Sequence[dict], n_classes: int,
                 columns: Sequence[str] = ("image", "label", "prediction")) -> None:
    """A grid PNG: one row per example, columns image | label | prediction (overlaid on the image).

    ``rows``: dicts with ``image`` (H, W, 3) uint8, ``label`` and ``prediction`` (H, W) int (predictions
    already mapped to classes).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), len(columns), figsize=(3.2 * len(columns), 2.6 * len(rows)),
                             squeeze=False)
    for r, row in enumerate(rows):
        for c, name in enumerate(columns):
            ax = axes[r][c]
            pic = row["image"] if name == "image" else overlay(row["image"], row[name], n_classes)
            ax.imshow(pic)
            ax.set_axis_off()
            if r == 0:
                ax.set_title(name)
    fig.tight_layout()
    fig.savefig(path, dpi=90, pil_kwargs=GRID_PNG)
    plt.close(fig)


def confusion_plot(path: str | Path, matrix: np.ndarray, class_names: Sequence[str], title: str) -> None:
    """Row-normalised confusion matrix (rows = ground truth, columns = matched prediction) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = matrix.T.astype(np.float64)  # metrics keep rows = prediction; people read rows = truth
    norm = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.45 * n, 0.8 + 0.45 * n))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), class_names, rotation=70, fontsize=7)
    ax.set_yticks(range(n), class_names, fontsize=7)
    ax.set_xlabel("prediction (Hungarian-matched)")
    ax.set_ylabel("ground truth")
    ax.set_title(title, fontsize=9)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if norm[i, j] >= 0.01:
                    ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=5,
                            color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def boundaries(labels: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels whose right or lower neighbour has another label."""
    b = np.zeros(labels.shape, dtype=bool)
    b[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    b[:-1, :] |= labels[:-1, :] != labels[1:, :]
    return b


def segments_picture(image: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """A segmentation level over its image: segment colours blended in, white segment boundaries."""
    pic = overlay(image, labels, n, alpha=0.5)
    pic[boundaries(labels)] = 255
    return pic


def hierarchy_strip(image: np.ndarray, levels: Sequence[np.ndarray]) -> np.ndarray:
    """image | coarsest level | ... | finest level, side by side: (H, (L + 1) W, 3) uint8.

    ``levels`` are (H, W) label maps fine to coarse (HSG's G0, G1, G2); shown coarse to fine.
    """
    pics = [image] + [segments_picture(image, lv, int(lv.max()) + 1) for lv in reversed(list(levels))]
    return np.concatenate(pics, axis=1)


def hierarchy_grid(path: str | Path, rows: Sequence[dict], title: str = "") -> None:
    """One row per example: image, then its hierarchy coarse to fine (``rows``: ``image``, ``levels``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_cols = 1 + max(len(r["levels"]) for r in rows)
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(3.2 * n_cols, 2.6 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        levels = list(reversed(list(row["levels"])))  # coarse to fine
        pics = [row["image"]] + [segments_picture(row["image"], lv, int(lv.max()) + 1) for lv in levels]
        counts = [len(np.unique(lv)) for lv in levels]
        names = ["image"] + [f"G{len(levels) - 1 - k}: {n} segment{'' if n == 1 else 's'}"
                             for k, n in enumerate(counts)]
        for c in range(n_cols):
            ax = axes[r][c]
            ax.set_axis_off()
            if c < len(pics):
                ax.imshow(pics[c])
                ax.set_title(names[c], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90, pil_kwargs=GRID_PNG)
    plt.close(fig)


def iou_bars(path: str | Path, class_names: Sequence[str], series: Sequence[dict], title: str = "") -> None:
    """Grouped bar chart of per-class IoU (%): one group per class, one bar per series, std as error bars.

    ``series``: dicts with ``label``, ``mean`` and ``std`` (sequences over classes; None = no value).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, m = len(class_names), max(len(series), 1)
    width = 0.8 / m
    fig, ax = plt.subplots(figsize=(min(16.0, max(6.0, 0.2 * n * m + 2.0)), 4.5))
    cols = palette(m + 1)[1:] / 255.0
    for s, ser in enumerate(series):
        xs = np.arange(n) + (s - (m - 1) / 2) * width
        mean = np.array([np.nan if v is None else v for v in ser["mean"]], dtype=float)
        std = np.array([0.0 if v is None else v for v in ser["std"]], dtype=float)
        ax.bar(xs, np.nan_to_num(mean), width, yerr=np.where(np.isnan(mean), 0, std), label=ser["label"],
               color=cols[s], capsize=2, error_kw={"elinewidth": 0.8})
    ax.set_xticks(range(n), class_names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("IoU (%)")
    ax.set_ylim(0, 100 + 6 * math.ceil(m / 4))  # room above the bars for the legend
    ax.set_yticks(range(0, 101, 20))
    ax.legend(fontsize=7, ncol=min(m, 4), loc="upper center", frameon=False)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
