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
