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


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def concept_curves(rows: Sequence[dict], metric: str = "presence"):
    """The paper's Figure 1 in the toy world: ``metric`` (presence or sim) against attack step,
    mean over seeds with the seed range shaded; one row of panels per concept, one column per
    attack, one line per model (``none`` = without immunization). Returns the figure."""
    import pandas as pd
    import seaborn as sns

    plt = _pyplot()
    frame = pd.DataFrame(list(rows))
    concepts, attacks = sorted(frame["concept"].unique()), sorted(frame["attack"].unique())
    fig, axes = plt.subplots(len(concepts), len(attacks), figsize=(3.8 * len(attacks), 2.9 * len(concepts)), squeeze=False, sharex=True, sharey=True)
    for i, concept in enumerate(concepts):
        for j, attack in enumerate(attacks):
            ax = axes[i][j]
            part = frame[(frame["attack"] == attack) & (frame["concept"] == concept)]
            sns.lineplot(data=part, x="step", y=metric, hue="method", marker="o", errorbar=("pi", 100), ax=ax)
            ax.set_title(f"{concept} · {attack}", fontsize=9)
            ax.set_xlabel("attack step" if i == len(concepts) - 1 else "")
            ax.set_ylabel(metric if j == 0 else "")
            if (i, j) != (0, len(attacks) - 1) and ax.get_legend():
                ax.get_legend().remove()
    if axes[0][-1].get_legend():
        axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def utility_bars(utility: dict[str, dict[str, dict]]):
    """Utility per threat and model: non-target presence and the Frechet distance of the judge
    features to the model without immunization (``utility[threat][method]`` with
    ``presence_mean`` and ``frechet``). Returns the figure."""
    import pandas as pd
    import seaborn as sns

    plt = _pyplot()
    frame = pd.DataFrame([{"threat": t, "method": m, "presence": u["presence_mean"], "frechet": u["frechet"]} for t, ms in utility.items() for m, u in ms.items()])
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, metric, label in zip(axes, ("presence", "frechet"), ("non-target presence", "Frechet distance (judge features)")):
        sns.barplot(data=frame, x="threat", y=metric, hue="method", ax=ax)
        ax.set_ylabel(label)
        ax.set_xlabel("")
    axes[0].set_ylim(0, 1)
    axes[1].get_legend().remove()
    axes[0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig


def sweep_heatmap(grid: Sequence[dict]):
    """The attacker-budget sweep: MSGR on presence over learning rate x LoRA rank, one panel per
    (attack, method); rows of ``grid`` carry attack, method, lr, lora_rank, msgr_presence."""
    import pandas as pd
    import seaborn as sns

    plt = _pyplot()
    frame = pd.DataFrame(list(grid))
    panels = sorted({(r["attack"], r["method"]) for r in grid})
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 2.8), squeeze=False)
    for ax, (attack, method) in zip(axes[0], panels):
        part = frame[(frame["attack"] == attack) & (frame["method"] == method)]
        table = part.pivot_table(index="lora_rank", columns="lr", values="msgr_presence", aggfunc="mean")
        sns.heatmap(table, annot=True, fmt=".0f", cmap="RdBu", center=0, vmin=-100, vmax=100, cbar=False, ax=ax)
        ax.set_title(f"{attack} · {method}", fontsize=9)
    fig.tight_layout()
    return fig


def scaling_plot(rows: Sequence[dict]):
    """MSGR and immunization time against the number of concepts N (rows: n_concepts,
    msgr_presence, seconds). Returns the figure."""
    plt = _pyplot()
    rows = sorted(rows, key=lambda r: r["n_concepts"])
    n = [r["n_concepts"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    axes[0].plot(n, [r["msgr_presence"] for r in rows], marker="o")
    axes[0].axhline(0, color="grey", lw=0.8)
    axes[0].set_ylabel("MSGR (presence)")
    axes[1].plot(n, [r["seconds"] for r in rows], marker="o")
    axes[1].set_ylabel("immunization seconds")
    for ax in axes:
        ax.set_xlabel("number of concepts N")
        ax.set_xticks(n)
    fig.tight_layout()
    return fig


def stored_sample_grid(samples: dict, attack: str, methods: Sequence[str], concepts: Sequence[str], seed: int, per_cell: int = 4) -> Image.Image:
    """A grid of stored attack samples (keys ``"<attack>/<method>/seed<seed>/step<step>/<concept>"``,
    see :func:`mci_lib.attacks.sample_tensors`): one row per (concept, method), ``per_cell``
    samples per attack step, steps left to right."""
    steps = sorted({int(k.split("/")[3][4:]) for k in samples if k.startswith(f"{attack}/")})
    rows, labels = [], []
    for concept in concepts:
        for method in methods:
            keys = [f"{attack}/{method}/seed{seed}/step{t}/{concept}" for t in steps]
            if all(k in samples for k in keys):
                rows.append(torch.cat([samples[k][:per_cell] for k in keys]))
                labels.append(f"{concept}/{method}")
    if not rows:
        raise KeyError(f"no stored samples for attack {attack!r}, seed {seed}")
    return image_grid(torch.cat(rows), nrow=per_cell * len(steps), scale=2, row_labels=labels)


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """``rows`` as a GitHub markdown table with ``columns`` in order."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"
