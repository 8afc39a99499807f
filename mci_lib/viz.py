"""Figures: image grids."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw


def image_grid(images: torch.Tensor, nrow: int, scale: int = 2, pad: int = 1, row_labels: Sequence[str] | None = None) -> Image.Image:
    """Tile uint8 images (N, 3, H, W) into a grid of ``nrow`` images per row, upscaled by ``scale``;
    optional labels are written left of each row."""
    n, _, h, w = images.shape
    rows = (n + nrow - 1) // nrow
    label_w = 8 * max((len(s) for s in row_labels), default=0) + 6 if row_labels else 0
    H, W = h * scale + pad, w * scale + pad
    canvas = Image.new("RGB", (label_w + nrow * W + pad, rows * H + pad), (255, 255, 255))
    arr = images.permute(0, 2, 3, 1).cpu().numpy().astype(np.uint8)
    for k in range(n):
        r, c = divmod(k, nrow)
        tile = Image.fromarray(arr[k]).resize((w * scale, h * scale), Image.NEAREST)
        canvas.paste(tile, (label_w + pad + c * W, pad + r * H))
    if row_labels:
        draw = ImageDraw.Draw(canvas)
        for r, text in enumerate(row_labels[:rows]):
            draw.text((3, pad + r * H + H // 2 - 6), text, fill=(0, 0, 0))
    return canvas


def save_image(image: Image.Image, path: str | Path) -> Path:
    """Save a PIL image atomically."""
    from .artifacts import atomic_file

    path = Path(path)
    with atomic_file(path, "wb") as fh:
        image.save(fh, format=path.suffix.lstrip(".").upper().replace("JPG", "JPEG") or "PNG")
    return path


def attack_curves(rows: Sequence[dict], metric: str = "presence"):
    """``metric`` (presence or sim) against attack step, mean over seeds: one panel per attack,
    one line per model (method), one line style per concept. Returns the matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    frame = pd.DataFrame(list(rows))
    attacks = sorted(frame["attack"].unique())
    fig, axes = plt.subplots(1, len(attacks), figsize=(4.2 * len(attacks), 3.4), squeeze=False, sharey=True)
    for ax, attack in zip(axes[0], attacks):
        part = frame[frame["attack"] == attack]
        sns.lineplot(data=part, x="step", y=metric, hue="method", style="concept", marker="o", errorbar=None, ax=ax)
        ax.set_title(attack)
        ax.set_xlabel("attack step")
        ax.set_ylabel(metric)
        if ax is not axes[0][-1]:
            ax.get_legend().remove()
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Save a matplotlib figure as PNG atomically."""
    from .artifacts import atomic_file

    path = Path(path)
    with atomic_file(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=dpi)
    return path
