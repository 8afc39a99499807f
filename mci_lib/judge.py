"""The toy world's judge (DESIGN sections 4 and 7): a small CNN with a subject head (shapes, personal
subjects and an "other" reject class), a color head and a style head.

A generated image counts as showing a subject only when the subject head picks it *and* its
softmax confidence reaches ``reject_threshold``; blobs, mixtures, noise and flat colors are trained
into the "other" class, so a collapsed model that draws the same blob for every prompt shows no
concept. The penultimate features are the toy world's image-similarity space (``sim``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .artifacts import atomic_dir, load_weights, read_json, save_weights, write_json
from .config import JudgeConfig, WorldConfig
from .data import draw_other, subjects

OTHER = "other"


@dataclass(frozen=True)
class JudgeLabels:
    subjects: tuple[str, ...]  # subject classes, "other" last
    colors: tuple[str, ...]
    styles: tuple[str, ...]
    feature_dim: int = 128
    reject_threshold: float = 0.5


class Judge(nn.Module):
    """Five 3x3 convolutions, global average pooling, a feature layer and three heads."""

    def __init__(self, labels: JudgeLabels):
        super().__init__()
        self.labels = labels

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.SiLU()]

        # one convolution at full resolution, then pool early: the toy world's shapes span 8-26 px
        self.body = nn.Sequential(
            *block(3, 32), nn.MaxPool2d(2),
            *block(32, 48), *block(48, 64), nn.MaxPool2d(2),
            *block(64, 96), nn.MaxPool2d(2),
            *block(96, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.features = nn.Sequential(nn.Linear(128, labels.feature_dim), nn.SiLU())
        self.subject_head = nn.Linear(labels.feature_dim, len(labels.subjects))
        self.color_head = nn.Linear(labels.feature_dim, len(labels.colors))
        self.style_head = nn.Linear(labels.feature_dim, len(labels.styles))

    def forward(self, images_uint8: torch.Tensor) -> dict[str, torch.Tensor]:
        x = images_uint8.float() / 127.5 - 1.0
        f = self.features(self.body(x))
        return {"features": f, "subject": self.subject_head(f), "color": self.color_head(f), "style": self.style_head(f)}


@dataclass
class Verdicts:
    """The judge's reading of a batch of images."""

    subject: list[str]  # "other" when rejected
    subject_confidence: np.ndarray
    color: list[str]
    style: list[str]
    features: torch.Tensor  # (N, feature_dim)


@torch.no_grad()
def classify(judge: Judge, images: torch.Tensor, batch_size: int = 512) -> Verdicts:
    """Judge uint8 images (N,3,H,W): subject with the reject option, color, style, features."""
    judge.eval()
    labels = judge.labels
    subj, conf, color, style, feats = [], [], [], [], []
    for i in range(0, images.shape[0], batch_size):
        out = judge(images[i : i + batch_size])
        p = out["subject"].softmax(-1)
        c, k = p.max(-1)
        for ci, ki in zip(c.tolist(), k.tolist()):
            name = labels.subjects[ki]
            subj.append(name if ci >= labels.reject_threshold else OTHER)
        conf.append(c.numpy())
        color += [labels.colors[j] for j in out["color"].argmax(-1).tolist()]
        style += [labels.styles[j] for j in out["style"].argmax(-1).tolist()]
        feats.append(out["features"])
    return Verdicts(subj, np.concatenate(conf), color, style, torch.cat(feats))


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mild photometric noise and blur, so generated (slightly soft) images are judged like drawn ones."""
    x = x.float()
    n = x.shape[0]
    blur = torch.rand(n, generator=gen) < 0.4
    if blur.any():
        k = torch.tensor([1.0, 2.0, 1.0])
        k = (k[:, None] * k[None, :]) / 16
        w = k.expand(3, 1, 3, 3)
        x[blur] = F.conv2d(F.pad(x[blur], (1, 1, 1, 1), mode="replicate"), w, groups=3)
    x = x * (1 + 0.08 * (torch.rand(n, 1, 1, 1, generator=gen) - 0.5)) + 10 * (torch.rand(n, 1, 1, 1, generator=gen) - 0.5)
    x = x + torch.randn(x.shape, generator=gen) * 4 * torch.rand(n, 1, 1, 1, generator=gen)
    return x.clamp(0, 255)


def other_pool(world: WorldConfig, n: int, seed: int) -> torch.Tensor:
    """``n`` images of the reject class (noise, flat colors, blobs, backgrounds, mixtures)."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(7919,)))
    arr = np.stack([draw_other(rng, world) for _ in range(n)])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def train_judge(
    images: torch.Tensor,
    subject_names: Sequence[str],
    color_names: Sequence[str],
    style_names: Sequence[str],
    world: WorldConfig,
    cfg: JudgeConfig,
    seed: int,
    progress: bool = True,
) -> tuple[Judge, list[float]]:
    """Train a judge on toy images (uint8) and their labels (``""`` color/style for personal
    subjects), plus a pool of reject-class images. Returns the judge and the loss per step."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    labels = JudgeLabels(
        subjects=tuple(subjects(world)) + (OTHER,),
        colors=tuple(world.colors),
        styles=tuple(world.styles),
        feature_dim=cfg.feature_dim,
        reject_threshold=cfg.reject_threshold,
    )
    judge = Judge(labels)
    s_idx = torch.tensor([labels.subjects.index(s) for s in subject_names])
    c_idx = torch.tensor([labels.colors.index(c) if c else -100 for c in color_names])
    y_idx = torch.tensor([labels.styles.index(s) if s else -100 for s in style_names])
    others = other_pool(world, max(256, int(images.shape[0] * cfg.other_share * 1.5)), seed)
    n_other = max(1, int(round(cfg.batch_size * cfg.other_share)))
    n_real = cfg.batch_size - n_other
    opt = torch.optim.AdamW(judge.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(cfg.steps, 1))
    losses = []
    judge.train()
    for _ in tqdm(range(cfg.steps), desc="judge", disable=not progress):
        # 1. real toy images plus reject-class images in every batch
        i = torch.randint(0, images.shape[0], (n_real,), generator=gen)
        j = torch.randint(0, others.shape[0], (n_other,), generator=gen)
        x = _augment(torch.cat([images[i], others[j]]), gen)
        other_id = len(labels.subjects) - 1
        ys = torch.cat([s_idx[i], torch.full((n_other,), other_id)])
        yc = torch.cat([c_idx[i], torch.full((n_other,), -100)])
        yy = torch.cat([y_idx[i], torch.full((n_other,), -100)])
        # 2. cross-entropy on each head; color and style only where the image has them
        out = judge(x)
        loss = F.cross_entropy(out["subject"], ys)
        if (yc >= 0).any():
            loss = loss + F.cross_entropy(out["color"], yc, ignore_index=-100) + F.cross_entropy(out["style"], yy, ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    judge.eval()
    return judge, losses


def save_judge(judge: Judge, folder: str | Path) -> Path:
    """Save as ``judge.safetensors`` plus ``labels.json`` (atomically)."""
    with atomic_dir(folder) as tmp:
        save_weights(tmp / "judge.safetensors", judge.state_dict())
        write_json(tmp / "labels.json", asdict(judge.labels))
    return Path(folder)


def load_judge(folder: str | Path) -> Judge:
    folder = Path(folder)
    meta = read_json(folder / "labels.json")
    labels = JudgeLabels(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta.items()})
    judge = Judge(labels)
    state = load_weights(folder / "judge.safetensors")
    try:
        missing, unexpected = judge.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatch: a judge saved by another architecture
        raise ValueError(f"{folder / 'judge.safetensors'}: tensors do not fit this judge ({str(err).splitlines()[1].strip()}); retrain it with the data_prep stage") from err
    if missing or unexpected:
        raise ValueError(f"{folder / 'judge.safetensors'}: tensors do not match the judge (missing {missing[:3]}, unexpected {unexpected[:3]})")
    judge.eval()
    return judge


def noise_images(world: WorldConfig, n: int, seed: int) -> torch.Tensor:
    """``n`` pure-noise and single-color images (half each), from seeds the judge never trained on."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(104729,)))
    arr = np.stack([draw_other(rng, world, "noise" if i % 2 == 0 else "flat") for i in range(n)])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def judge_report(judge: Judge, test_images: torch.Tensor, test_subjects: Sequence[str], world: WorldConfig, seed: int, n_noise: int = 400) -> dict:
    """``judge_test_accuracy`` (subject head, reject option on, held-out toy images) and
    ``judge_reject_rate_on_noise`` (share of pure-noise and single-color images judged "other");
    with real concepts also ``judge_real_test_accuracy`` per concept (views of held-out images)."""
    verdict = classify(judge, test_images)
    hits = [a == b for a, b in zip(verdict.subject, test_subjects)]
    acc = float(np.mean(hits))
    noise = classify(judge, noise_images(world, n_noise, seed))
    report = {"judge_test_accuracy": acc, "judge_reject_rate_on_noise": float(np.mean([s == OTHER for s in noise.subject]))}
    if world.real:
        # each real concept's held-out paintings alone: the judge must know them, not only the shapes
        report["judge_real_test_accuracy"] = {c: float(np.mean([h for h, s in zip(hits, test_subjects) if s == c])) for c in world.real}
    return report
