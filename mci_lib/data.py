"""Concept data: the synthetic toy world (DESIGN section 4) and readers for real concept folders.

The toy world draws one shape on a lightly textured background at 32x32 px. Every image has a
*subject* (a shape, or a personal subject that pretraining never sees), a *color* and a *style*
(a fill pattern). Images are drawn at 4x resolution with PIL and numpy and downsampled, so edges
are anti-aliased. Everything is a pure function of the seed: the same seed gives the same bytes.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter, UnidentifiedImageError

from .config import WorldConfig

SPLITS = ("pretrain", "defense", "attack", "reference", "judge_train", "judge_test")
SCALE = 4  # drawing super-sampling factor

# Hues spread so that neighbours (red/orange/yellow, blue/purple) differ by at least ~90 in one
# channel: a tiny model's samples drift by a few tens of levels, and the judge must still read them.
COLOR_RGB = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 230),
    "yellow": (240, 230, 40),
    "purple": (160, 30, 200),
    "orange": (255, 135, 0),
}

# Personal subjects: composite designs that pretraining never shows, each with the class word
# used for prior preservation and the placeholder token an attacker teaches.
PERSONAL_SUBJECTS = {
    # token: the placeholder that token attacks add; identifier: the rare single CLIP token that
    # DreamBooth writes instead (as its users do with "sks"), distinct per subject
    "p1": {"token": "<p1>", "identifier": "sks", "class_word": "badge", "description": "a yellow star inside a blue ring"},
    "p2": {"token": "<p2>", "identifier": "ohwx", "class_word": "tile", "description": "a red cross on a green square"},
}

CAPTION_TEMPLATES = (
    "a photo of a {color} {shape}",
    "a {color} {shape}, {style} style",
    "a {style} {color} {shape}",
    "a photo of a {shape}",
    "a {shape}, {style} style",
    "a {color} {shape}",
)


@dataclass(frozen=True)
class ToyRecord:
    file: str  # path relative to the data folder
    split: str
    subject: str  # shape name or personal subject id
    color: str  # "" for personal subjects
    style: str  # "" for personal subjects
    caption: str


# ---------------------------------------------------------------------------------------------
# drawing


def _polygon(shape: str, cx: float, cy: float, r: float, theta: float) -> list[tuple[float, float]]:
    """Vertices of a shape of radius ``r`` centred at (cx, cy), rotated by ``theta`` radians."""
    if shape == "square":
        pts = [(math.cos(a), math.sin(a)) for a in (math.pi / 4 + k * math.pi / 2 for k in range(4))]
        pts = [(x * 0.95, y * 0.95) for x, y in pts]
    elif shape == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))]
        pts = [(x * 1.1, y * 1.1 + 0.15) for x, y in pts]
    elif shape == "star":
        pts = []
        for k in range(10):
            a = -math.pi / 2 + k * math.pi / 5
            rad = 1.05 if k % 2 == 0 else 0.45
            pts.append((rad * math.cos(a), rad * math.sin(a)))
    elif shape == "heart":
        pts = []
        for k in range(48):
            t = 2 * math.pi * k / 48
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((x / 16.5, -y / 16.5 + 0.1))
    elif shape == "cross":
        w = 0.34
        pts = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)]
        pts = [(x * 0.95, y * 0.95) for x, y in pts]
    else:
        raise ValueError(f"unknown polygon shape {shape!r}")
    c, s = math.cos(theta), math.sin(theta)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def _mask(shape: str, size: int, cx: float, cy: float, r: float, theta: float) -> np.ndarray:
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    if shape in ("circle", "ring"):
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, theta), fill=255)
    return np.asarray(img, dtype=np.float32) / 255.0


def _erode(mask: np.ndarray, px: int) -> np.ndarray:
    """Binary-style erosion by a (2px+1)-square, as two separable running minima."""
    k = 2 * px + 1
    padded = np.pad(mask, px, mode="constant")
    rows = np.lib.stride_tricks.sliding_window_view(padded, k, axis=1).min(-1)
    return np.lib.stride_tricks.sliding_window_view(rows, k, axis=0).min(-1)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    base = 232 + rng.uniform(-8, 8) + rng.uniform(-6, 6, size=3)
    coarse = rng.normal(0, 6, size=(6, 6, 3)).astype(np.float32)
    texture = np.stack(
        [np.asarray(Image.fromarray(coarse[..., k]).resize((size, size), Image.BICUBIC)) for k in range(3)], -1
    )
    return base[None, None, :] + texture


def _paint(canvas: np.ndarray, mask: np.ndarray, rgb) -> np.ndarray:
    return canvas * (1 - mask[..., None]) + np.asarray(rgb, np.float32)[None, None, :] * mask[..., None]


def _styled_shape(canvas, shape, color, style, cx, cy, r, theta, size):
    """Paint one shape of ``color`` in fill ``style`` onto ``canvas`` (float HxWx3, 0..255)."""
    rgb = np.asarray(COLOR_RGB[color], np.float32)
    tint = 0.35 * rgb + 0.65 * 255.0
    mask = _mask(shape, size, cx, cy, r, theta)
    outline = np.clip(mask - _erode(mask, 2 * SCALE // 2 + 1), 0, 1)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    u = (xx - cx) * math.cos(theta) + (yy - cy) * math.sin(theta)
    v = -(xx - cx) * math.sin(theta) + (yy - cy) * math.cos(theta)
    if style == "solid":
        return _paint(canvas, mask, rgb)
    if style == "outlined":
        thick = np.clip(mask - _erode(mask, int(2.2 * SCALE)), 0, 1)
        return _paint(canvas, thick, rgb)
    canvas = _paint(canvas, mask, tint)
    if style == "striped":
        period = 3.0 * SCALE
        pattern = ((np.floor(u / period) % 2) == 0).astype(np.float32)
    elif style == "dotted":
        period = 4.0 * SCALE
        du = (u % period) - period / 2
        dv = (v % period) - period / 2
        pattern = ((du**2 + dv**2) < (1.2 * SCALE) ** 2).astype(np.float32)
    else:
        raise ValueError(f"unknown style {style!r}")
    canvas = _paint(canvas, mask * pattern, rgb)
    return _paint(canvas, outline, rgb)


def _placement(rng: np.random.Generator, size: int, rmin: float, rmax: float, jitter: float, max_rotation: float):
    """Radius in [rmin, rmax] x size; centre moved off the middle by up to ``jitter`` of the free
    room; rotation uniform in +-``max_rotation`` degrees."""
    r = rng.uniform(rmin, rmax) * size
    room = max(size / 2 - r * 1.05, 0.0) * jitter
    cx = size / 2 + rng.uniform(-room, room)
    cy = size / 2 + rng.uniform(-room, room)
    theta = math.radians(rng.uniform(-max_rotation, max_rotation))
    return cx, cy, r, theta


def _finish(canvas: np.ndarray, rng: np.random.Generator, image_size: int) -> np.ndarray:
    img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8)).resize((image_size, image_size), Image.LANCZOS)
    arr = np.asarray(img, np.float32) + rng.normal(0, 2.5, size=(image_size, image_size, 3))
    return np.clip(np.round(arr), 0, 255).astype(np.uint8)


def draw_concept(
    rng: np.random.Generator, subject: str, color: str, style: str, image_size: int = 32, jitter: float = 1.0, max_rotation: float = 25.0, min_radius: float = 0.26
) -> np.ndarray:
    """Draw one toy image (HxWx3 uint8): a shape ``subject`` of ``color`` in ``style``, or a
    personal subject (``p1``, ``p2``; color and style are then ignored). ``jitter`` (0..1) is how
    far from the centre a shape may sit, ``max_rotation`` its rotation range in degrees and
    ``min_radius`` its smallest radius as a share of the image (the largest is 0.42)."""
    size = image_size * SCALE
    canvas = _background(rng, size)
    place = lambda lo: _placement(rng, size, max(lo, min_radius), 0.42, jitter, max_rotation)
    if subject == "p1":  # a yellow star inside a blue ring
        cx, cy, r, theta = place(0.30)
        canvas = _styled_shape(canvas, "circle", "blue", "outlined", cx, cy, r, theta, size)
        canvas = _styled_shape(canvas, "star", "yellow", "solid", cx, cy, 0.58 * r, theta, size)
    elif subject == "p2":  # a red cross on a green square
        cx, cy, r, theta = place(0.30)
        canvas = _styled_shape(canvas, "square", "green", "solid", cx, cy, r, theta, size)
        canvas = _styled_shape(canvas, "cross", "red", "solid", cx, cy, 0.6 * r, theta, size)
    else:
        cx, cy, r, theta = place(min_radius)
        canvas = _styled_shape(canvas, subject, color, style, cx, cy, r, theta, size)
    return _finish(canvas, rng, image_size)


OTHER_KINDS = ("noise", "flat", "blob", "background", "mixture", "blur")


def draw_other(rng: np.random.Generator, world: WorldConfig, kind: str | None = None) -> np.ndarray:
    """Draw one image that shows *no* concept, for the judge's reject class: pure noise, a single
    flat color, a blob, an empty background, a mixture of two concepts, or a heavy blur of one.
    ``kind`` picks one of ``OTHER_KINDS``; by default it is drawn at random."""
    n = world.image_size
    kind = OTHER_KINDS.index(kind) if kind is not None else rng.integers(0, len(OTHER_KINDS))
    if kind == 0:  # pure noise, uniform or Gaussian
        if rng.random() < 0.5:
            return rng.integers(0, 256, size=(n, n, 3), dtype=np.uint8)
        return np.clip(rng.normal(rng.uniform(60, 200), rng.uniform(20, 80), size=(n, n, 3)), 0, 255).astype(np.uint8)
    if kind == 1:  # one flat color, lightly noisy
        rgb = rng.integers(0, 256, size=3)
        return np.clip(rgb[None, None, :] + rng.normal(0, rng.uniform(0, 6), size=(n, n, 3)), 0, 255).astype(np.uint8)
    if kind == 2:  # a smooth random blob on a background
        size = n * SCALE
        canvas = _background(rng, size)
        field = rng.normal(size=(5, 5)).astype(np.float32)
        field = np.asarray(Image.fromarray(field).resize((size, size), Image.BICUBIC))
        yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
        blob = (field - 4 * (xx**2 + yy**2) * rng.uniform(2, 8) > 0).astype(np.float32)
        blob = np.asarray(Image.fromarray((blob * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(SCALE * rng.uniform(0.5, 3))), np.float32) / 255
        rgb = COLOR_RGB[world.colors[rng.integers(len(world.colors))]] if rng.random() < 0.7 else rng.integers(0, 256, 3)
        return _finish(_paint(canvas, blob, rgb), rng, n)
    if kind == 3:  # background only
        return _finish(_background(rng, n * SCALE), rng, n)
    # mixtures: two different concepts blended, or a heavy blur of one
    a, b = rng.choice(len(world.shapes), size=2, replace=False)
    img_a = draw_concept(rng, world.shapes[a], world.colors[rng.integers(len(world.colors))], world.styles[rng.integers(len(world.styles))], n)
    if kind == 4:
        img_b = draw_concept(rng, world.shapes[b], world.colors[rng.integers(len(world.colors))], world.styles[rng.integers(len(world.styles))], n)
        return ((img_a.astype(np.float32) + img_b) / 2).astype(np.uint8)
    return np.asarray(Image.fromarray(img_a).filter(ImageFilter.GaussianBlur(rng.uniform(4, 6))))


# the (outer, inner) shape pairs of the personal subjects' designs: codec images never nest these
PERSONAL_LAYOUTS = {"p1": ("circle", "star"), "p2": ("square", "cross")}


def _shape_pair(rng: np.random.Generator, world: WorldConfig) -> tuple[str, str]:
    """Two of the world's shapes (outer, inner), never a personal subject's own nesting."""
    forbidden = {PERSONAL_LAYOUTS[p] for p in world.personal if p in PERSONAL_LAYOUTS}
    while True:
        outer, inner = (world.shapes[i] for i in rng.choice(len(world.shapes), size=2, replace=len(world.shapes) < 2))
        if (outer, inner) not in forbidden:
            return outer, inner


def _color_pair(rng: np.random.Generator, world: WorldConfig) -> tuple[str, str]:
    """Two different colors of the world (the same one only if it has one)."""
    c1, c2 = rng.choice(len(world.colors), size=2, replace=len(world.colors) < 2)
    return world.colors[c1], world.colors[c2]


def _stack(images: list[np.ndarray], image_size: int) -> torch.Tensor:
    """HxWx3 uint8 arrays as one uint8 [n, 3, H, W] tensor (empty when there are none)."""
    if not images:
        return torch.zeros(0, 3, image_size, image_size, dtype=torch.uint8)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def draw_codec(rng: np.random.Generator, world: WorldConfig) -> np.ndarray:
    """Draw one *codec* image (HxWx3 uint8) for the VAE's training pool: two of the world's shapes
    in two different colors and random styles, either one nested inside the other or two that
    overlap. A VAE is a general image codec (the real SD VAE reconstructs subjects it never saw);
    trained on one-color pretrain images alone it cannot draw two-colored objects, and no attack
    can then personalize a two-colored subject. The personal subjects' own nestings
    (``PERSONAL_LAYOUTS``) are never drawn, so the VAE must generalize to them."""
    size = world.image_size * SCALE
    canvas = _background(rng, size)
    outer, inner = _shape_pair(rng, world)
    c1, c2 = _color_pair(rng, world)
    style = lambda: world.styles[rng.integers(len(world.styles))]
    if rng.random() < 0.5:  # nested: a shape inside another, as the personal designs are
        cx, cy, r, theta = _placement(rng, size, 0.3, 0.42, world.position_jitter, world.max_rotation)
        canvas = _styled_shape(canvas, outer, c1, style(), cx, cy, r, theta, size)
        canvas = _styled_shape(canvas, inner, c2, "solid", cx, cy, rng.uniform(0.45, 0.65) * r, theta, size)
    else:  # two smaller shapes that may overlap
        for shape, color in ((outer, c1), (inner, c2)):
            cx, cy, r, theta = _placement(rng, size, 0.18, 0.3, 1.0, world.max_rotation)
            canvas = _styled_shape(canvas, shape, color, style(), cx, cy, r, theta, size)
    return _finish(canvas, rng, world.image_size)


# how a composite's caption names its two parts (data.draw_composite)
COMPOSITE_TEMPLATES = (
    "a {inner_color} {inner} inside a {outer_color} {outer}",
    "a {inner_color} {inner} on a {outer_color} {outer}, {style} style",
    "a photo of a {inner} inside a {outer}",
)


def draw_composite(rng: np.random.Generator, world: WorldConfig) -> tuple[np.ndarray, str]:
    """Draw one captioned *composite* for the UNet's pretraining (``world.pretrain_composites``):
    one of the world's shapes nested inside another, in two colors, as the personal designs are
    (DESIGN section 4), and a caption naming both parts ("a yellow heart inside a blue square").
    It lets the base model learn to compose two shapes from words, so that a personal subject is
    a new combination an attacker can teach, as a new face is to Stable Diffusion. The personal
    subjects' own nestings (``PERSONAL_LAYOUTS``) are never drawn. Returns (HxWx3 uint8, caption)."""
    if len(world.shapes) < 2:
        raise ValueError("params world.pretrain_composites needs at least two world.shapes (or set it to 0)")
    size = world.image_size * SCALE
    canvas = _background(rng, size)
    outer, inner = _shape_pair(rng, world)
    c1, c2 = _color_pair(rng, world)
    style = world.styles[rng.integers(len(world.styles))]
    cx, cy, r, theta = _placement(rng, size, 0.3, 0.42, world.position_jitter, world.max_rotation)
    canvas = _styled_shape(canvas, outer, c1, style, cx, cy, r, theta, size)
    canvas = _styled_shape(canvas, inner, c2, "solid", cx, cy, rng.uniform(0.5, 0.65) * r, theta, size)
    template = COMPOSITE_TEMPLATES[rng.integers(len(COMPOSITE_TEMPLATES))]
    caption = template.format(inner=inner, inner_color=c2, outer=outer, outer_color=c1, style=style)
    return _finish(canvas, rng, world.image_size), caption


def composite_images(world: WorldConfig, seed: int) -> tuple[torch.Tensor, list[ToyRecord]]:
    """``world.pretrain_composites`` captioned composites (:func:`draw_composite`) from their own
    seeded stream, as uint8 [n, 3, H, W] images and in-memory ``pretrain`` records (subject
    ``composite``, no file) whose captions :func:`fresh_caption` keeps."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(4343,)))
    drawn = [draw_composite(rng, world) for _ in range(world.pretrain_composites)]
    records = [ToyRecord(file="", split="pretrain", subject="composite", color="", style="", caption=c) for _, c in drawn]
    return _stack([img for img, _ in drawn], world.image_size), records


def codec_images(world: WorldConfig, seed: int) -> torch.Tensor:
    """``world.codec_images`` codec images (uint8 [n, 3, H, W], :func:`draw_codec`) from their own
    seeded stream: the extra VAE training pool of DESIGN section 4's base model (the UNet never
    sees them)."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(4242,)))
    return _stack([draw_codec(rng, world) for _ in range(world.codec_images)], world.image_size)


def subjects(world: WorldConfig) -> list[str]:
    """Every subject the judge knows: the shapes, the personal subjects, then the real concepts."""
    return list(world.shapes) + list(world.personal) + list(world.real)


def concept_word(subject: str) -> str:
    """The words that name a real concept in its prompts: its folder name with underscores as
    spaces ("Van_Gogh" -> "Van Gogh"). Erasure and the merge find the concept's tokens by them."""
    return subject.replace("_", " ")


def fresh_caption(rng: np.random.Generator, record: ToyRecord) -> str:
    """A pretraining caption for ``record``: a fresh template caption for a shape, the stored
    caption for anything else (a real concept keeps its metadata prompt)."""
    if record.color:
        return caption_for(rng, record.subject, record.color, record.style)
    return record.caption


def real_prompts(records: Sequence[ToyRecord], subject: str) -> list[str]:
    """The distinct prompts of a real concept's records (its metadata prompts), sorted."""
    prompts = sorted({r.caption for r in records if r.subject == subject})
    if not prompts:
        raise ValueError(f"real concept {subject!r} has no images in the data index; regenerate the data (notebooks/01_data_prep.ipynb) with it in world.real")
    return prompts


def caption_for(rng: np.random.Generator, subject: str, color: str, style: str) -> str:
    """A caption from the templates (personal subjects are named by their placeholder token)."""
    if subject in PERSONAL_SUBJECTS:
        p = PERSONAL_SUBJECTS[subject]
        return f"a photo of {p['token']} {p['class_word']}"
    template = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))]
    return template.format(shape=subject, color=color, style=style)


def regularization_captions(world: WorldConfig, n: int, seed: int, exclude: Sequence[str] = ()) -> list[str]:
    """A fixed, seeded, local caption set for the merge's regularization term: template captions
    over the shapes not in ``exclude`` (so the merge keeps the model's outputs on them)."""
    shapes = [s for s in world.shapes if s not in exclude]
    if not shapes:
        raise ValueError("regularization_captions: every shape is excluded")
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(31337,)))
    return [
        caption_for(rng, shapes[rng.integers(len(shapes))], world.colors[rng.integers(len(world.colors))], world.styles[rng.integers(len(world.styles))])
        for _ in range(n)
    ]


def _split_sizes(world: WorldConfig, subject: str) -> dict[str, int]:
    personal = subject in world.personal
    return {
        "pretrain": 0 if personal else world.pretrain_per_shape,
        "defense": world.defense_per_subject,
        "attack": world.attack_per_subject,
        "reference": world.reference_per_subject,
        "judge_train": world.judge_train_per_subject,
        "judge_test": world.judge_test_per_subject,
    }


def _check_world(world: WorldConfig) -> None:
    clash = sorted(set(world.real) & (set(world.shapes) | set(world.personal)))
    if clash or len(set(world.real)) != len(world.real):
        raise ValueError(f"params world.real: {sorted(world.real)} repeats a name or a shape/personal subject ({clash})")
    for c in world.colors:
        if c not in COLOR_RGB:
            raise ValueError(f"params world.colors: unknown color {c!r}; known: {', '.join(COLOR_RGB)}")
    for p in world.personal:
        if p not in PERSONAL_SUBJECTS:
            raise ValueError(f"params world.personal: unknown personal subject {p!r}; known: {', '.join(PERSONAL_SUBJECTS)}")
    for s in world.shapes:
        if s != "circle":
            _polygon(s, 0, 0, 1, 0)  # raises for an unknown shape
    for s in world.styles:
        if s not in ("solid", "striped", "dotted", "outlined"):
            raise ValueError(f"params world.styles: unknown style {s!r}")


def real_view(rng: np.random.Generator, image: np.ndarray, size: int) -> np.ndarray:
    """A random view of a square real image (H, W, 3 uint8): a crop of 70-100% of its side at a
    random place, mirrored half the time, resized to ``size``. Many distinct training images from a
    few paintings, as random-crop augmentation does for real fine-tuning sets."""
    side = image.shape[0]
    crop = int(round(side * rng.uniform(0.7, 1.0)))
    top, left = (int(v) for v in rng.integers(0, side - crop + 1, size=2))
    view = Image.fromarray(image[top : top + crop, left : left + crop])
    if rng.random() < 0.5:
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(view.resize((size, size), Image.BICUBIC))


# a real concept's held-out images serve only these splits (the judge's test and the similarity reference)
REAL_HOLDOUT_SPLITS = ("judge_test", "reference")


def generate_records(world: WorldConfig, seed: int, real: Sequence[ConceptImages] = ()) -> Iterable[tuple[ToyRecord, np.ndarray]]:
    """Yield every (record, image) of the toy world. Each (subject, split) pair has its own child
    seed, so changing one split's size leaves the others' images unchanged. The concepts of
    ``world.real`` come from ``real`` (read with :func:`read_real_concepts`): each of their
    splits is drawn as random views of its images, ``world.real_holdout`` of them (chosen by the
    seed) held out for the judge_test and reference splits."""
    _check_world(world)
    by_name = {c.name: c for c in real}
    missing = [n for n in world.real if n not in by_name]
    if missing:
        raise ValueError(f"params world.real names {missing}, but no images were given for them (read them with data.read_real_concepts)")
    for si, subject in enumerate(subjects(world)):
        pools = None
        if subject in by_name:
            concept = by_name[subject]
            n = concept.images.shape[0]
            if n <= world.real_holdout:
                raise ValueError(f"{concept.folder}: {n} images, but world.real_holdout keeps {world.real_holdout} aside; add images or lower world.real_holdout")
            order = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(si, 997))).permutation(n)
            pools = {True: order[: world.real_holdout], False: order[world.real_holdout :]}
            arrays = concept.images.permute(0, 2, 3, 1).numpy()
        for pi, split in enumerate(SPLITS):
            rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(si, pi)))
            for i in range(_split_sizes(world, subject)[split]):
                if pools is not None:
                    pool = pools[split in REAL_HOLDOUT_SPLITS]
                    j = int(pool[rng.integers(len(pool))])
                    image = real_view(rng, arrays[j], world.image_size)
                    record = ToyRecord(f"images/{split}/{subject}_{i:04d}.png", split, subject, "", "", concept.prompts[j])
                    yield record, image
                    continue
                if subject in world.personal:
                    color, style = "", ""
                else:
                    color = world.colors[rng.integers(len(world.colors))]
                    style = world.styles[rng.integers(len(world.styles))]
                image = draw_concept(rng, subject, color, style, world.image_size, world.position_jitter, world.max_rotation, world.min_radius)
                caption = caption_for(rng, subject, color, style)
                record = ToyRecord(f"images/{split}/{subject}_{i:04d}.png", split, subject, color, style, caption)
                yield record, image


INDEX_FIELDS = ("file", "split", "subject", "color", "style", "caption")


def write_toy_world(world: WorldConfig, seed: int, out_dir: str | Path, progress: bool = True, real: Sequence[ConceptImages] = ()) -> Path:
    """Generate the toy world (with the real concepts of ``world.real``, from ``real``) into
    ``out_dir``: PNG images per split, ``index.csv`` (one row per image), ``splits/<split>.txt``
    file lists and ``world.json`` (the concept lists). Written to a temporary folder beside
    ``out_dir`` and renamed when complete."""
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        for split in SPLITS:
            (tmp / "images" / split).mkdir(parents=True)
        (tmp / "splits").mkdir()
        total = sum(sum(_split_sizes(world, s).values()) for s in subjects(world))
        rows: list[ToyRecord] = []
        for record, image in tqdm(generate_records(world, seed, real), total=total, desc="toy world", disable=not progress):
            Image.fromarray(image).save(tmp / record.file, optimize=False)
            rows.append(record)
        with open(tmp / "index.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(INDEX_FIELDS)
            for r in rows:
                writer.writerow([getattr(r, f) for f in INDEX_FIELDS])
        for split in SPLITS:
            (tmp / "splits" / f"{split}.txt").write_text("".join(r.file + "\n" for r in rows if r.split == split))
        meta = {
            "seed": seed,
            "image_size": world.image_size,
            "shapes": list(world.shapes),
            "colors": list(world.colors),
            "styles": list(world.styles),
            "personal": {p: PERSONAL_SUBJECTS[p] for p in world.personal},
            "real": {c.name: {"folder": str(c.folder), "images": len(c.files), "prompts": sorted(set(c.prompts))} for c in real if c.name in world.real},
            "splits": list(SPLITS),
        }
        (tmp / "world.json").write_text(json.dumps(meta, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def read_index(data_dir: str | Path) -> list[ToyRecord]:
    """Read ``index.csv`` of a generated toy world."""
    path = Path(data_dir) / "index.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: toy world index not found. Generate it with notebooks/01_data_prep.ipynb (or `dvc repro`).")
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = set(INDEX_FIELDS) - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: missing columns {sorted(missing)}; regenerate the toy world")
        return [ToyRecord(**{k: row[k] for k in INDEX_FIELDS}) for row in reader]


def load_images(data_dir: str | Path, records: Sequence[ToyRecord]) -> torch.Tensor:
    """Images of ``records`` as a uint8 tensor (N, 3, H, W)."""
    arrays = [np.asarray(Image.open(Path(data_dir) / r.file).convert("RGB")) for r in records]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def select(records: Sequence[ToyRecord], split: str | None = None, subject: str | None = None) -> list[ToyRecord]:
    return [r for r in records if (split is None or r.split == split) and (subject is None or r.subject == subject)]


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N,3,H,W) in 0..255 -> float in [-1, 1], the VAE's input range."""
    return images.float() / 127.5 - 1.0


def from_model_range(images: torch.Tensor) -> torch.Tensor:
    """float in [-1, 1] -> uint8 in 0..255."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


# ---------------------------------------------------------------------------------------------
# real concept folders


@dataclass
class ConceptImages:
    """Images of one real concept read from a folder."""

    name: str
    folder: Path
    files: list[str]
    prompts: list[str]
    images: torch.Tensor  # uint8 (N, 3, size, size)
    class_prompt: str | None = None
    class_folder: Path | None = None


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def load_image_file(path: Path, size: int) -> np.ndarray:
    """Read one image as RGB (grayscale and RGBA are converted), centre-crop it to a square and
    resize it to ``size``; a missing, corrupt or truncated file raises an error naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image file not found")
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                img = Image.alpha_composite(white, rgba).convert("RGB")
            else:
                img = img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"{path}: cannot read this image ({err}). Replace or remove the file.") from err
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
    return np.asarray(img)


def read_concept_folder(folder: str | Path, size: int, name: str | None = None, default_prompt: str | None = None) -> ConceptImages:
    """Read a real concept folder: ``metadata.csv`` with columns ``file_name,prompt`` (the layout of
    the MIMA reference data); without it, every image file with ``default_prompt``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: concept folder not found")
    meta = folder / "metadata.csv"
    files: list[str]
    prompts: list[str]
    if meta.is_file():
        with open(meta, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or not {"file_name", "prompt"} <= set(reader.fieldnames):
                raise ValueError(f"{meta}: needs the columns file_name,prompt; found {reader.fieldnames}")
            rows = list(reader)
        files = [row["file_name"] for row in rows]
        prompts = [row["prompt"] for row in rows]
        for f in files:
            if not (folder / f).is_file():
                raise FileNotFoundError(f"{meta}: row names {f!r}, but {folder / f} does not exist. Add the file or remove the row.")
    else:
        if default_prompt is None:
            raise FileNotFoundError(f"{meta}: not found, and no prompt was given for the images in {folder}")
        files = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        prompts = [default_prompt] * len(files)
    if not files:
        raise ValueError(f"{folder}: no images in this concept folder")
    images = np.stack([load_image_file(folder / f, size) for f in files])
    return ConceptImages(
        name=name or folder.name,
        folder=folder,
        files=files,
        prompts=prompts,
        images=torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
    )


CONCEPT_LIST_KEYS = ("instance_prompt", "class_prompt", "instance_data_dir", "class_data_dir")


def read_concept_list(path: str | Path, size: int) -> list[ConceptImages]:
    """Read a MIMA/Custom-Diffusion concept-list JSON: a list of objects with ``instance_prompt``,
    ``class_prompt``, ``instance_data_dir`` and ``class_data_dir``. Relative folders are taken
    relative to the JSON file. Class folders may not exist yet (they are sampled later)."""
    path = Path(path)
    try:
        entries = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{path}: concept list not found") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: must be a non-empty JSON list of concepts")
    concepts, seen = [], set()
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: entry {i} must be an object with keys {', '.join(CONCEPT_LIST_KEYS)}")
        missing = [k for k in ("instance_prompt", "instance_data_dir") if k not in entry]
        if missing:
            raise ValueError(f"{path}: entry {i} lacks {', '.join(missing)}")
        unknown = sorted(set(entry) - set(CONCEPT_LIST_KEYS))
        if unknown:
            raise ValueError(f"{path}: entry {i} has unknown key(s) {', '.join(unknown)}; allowed: {', '.join(CONCEPT_LIST_KEYS)}")
        folder = Path(entry["instance_data_dir"])
        folder = folder if folder.is_absolute() else path.parent / folder
        if str(folder.resolve()) in seen:
            raise ValueError(f"{path}: entry {i} repeats instance_data_dir {entry['instance_data_dir']!r}")
        seen.add(str(folder.resolve()))
        concept = read_concept_folder(folder, size, default_prompt=entry["instance_prompt"])
        concept.prompts = [entry["instance_prompt"]] * len(concept.files)
        concept.class_prompt = entry.get("class_prompt")
        if entry.get("class_data_dir"):
            cfolder = Path(entry["class_data_dir"])
            concept.class_folder = cfolder if cfolder.is_absolute() else path.parent / cfolder
        concepts.append(concept)
    return concepts




def read_real_concepts(source: str | Path, names: Sequence[str], size: int) -> list[ConceptImages]:
    """The real concepts ``names`` (``world.real``) from ``source`` (``paths.real_concepts``): a
    folder holding one concept folder per name, or a MIMA concept-list JSON whose instance
    folders carry those names. Images are read at ``size`` px. Every prompt must contain the
    concept's words (:func:`concept_word`), which erasure and immunization look for."""
    source = Path(source)
    if source.is_file():
        concepts = {c.name: c for c in read_concept_list(source, size)}
    elif source.is_dir():
        concepts = {n: read_concept_folder(source / n, size, name=n) for n in names if (source / n).is_dir()}
    else:
        raise FileNotFoundError(f"{source}: real concept source not found (paths.real_concepts); copy your concept folders there")
    missing = [n for n in names if n not in concepts]
    if missing:
        found = sorted(p.name for p in source.iterdir() if p.is_dir()) if source.is_dir() else sorted(concepts)
        raise FileNotFoundError(f"{source}: no concept folder named {', '.join(missing)} (world.real); found {found}. Add the folder or fix world.real.")
    for name in names:
        word = concept_word(name).lower()
        for f, prompt in zip(concepts[name].files, concepts[name].prompts):
            if word not in prompt.lower():
                raise ValueError(f"{concepts[name].folder / f}: its prompt {prompt!r} does not contain {concept_word(name)!r}, the words that name concept "
                                 f"{name!r}; fix the prompt in metadata.csv or rename the folder after the words the prompts use")
    return [concepts[n] for n in names]
