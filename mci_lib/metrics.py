"""Metrics on judged samples (DESIGN section 7)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def presence(subjects: Sequence[str], target: str) -> float:
    """presence_c: the share of generated images the judge classifies as ``target``."""
    if not subjects:
        raise ValueError("presence: no images")
    return float(np.mean([s == target for s in subjects]))


def attribute_accuracy(predicted: Sequence[str], prompted: Sequence[str]) -> float:
    """Share of images whose judged attribute (color, style) equals the prompted one."""
    if len(predicted) != len(prompted) or not predicted:
        raise ValueError("attribute_accuracy: need equal, non-empty lists")
    return float(np.mean([p == q for p, q in zip(predicted, prompted)]))


def mean_cosine_similarity(features: torch.Tensor, reference: torch.Tensor) -> float:
    """sim_c: mean cosine similarity between generated and reference images' features (every pair)."""
    a = torch.nn.functional.normalize(features.float(), dim=-1)
    b = torch.nn.functional.normalize(reference.float(), dim=-1)
    return float((a @ b.T).mean())


def shape_presence_table(pipe, judge, shapes: Sequence[str], colors: Sequence[str], sampling, progress: bool = False) -> dict:
    """Sample ``sampling.samples_per_concept`` images per shape from prompts "a photo of a <color>
    <shape>" (colors cycling, seeds ``sampling.seed + i``, the same for every shape and model) and
    judge them. Returns per-shape presence and color accuracy, and the samples themselves."""
    from .judge import classify
    from .sampling import sample_images

    n = sampling.samples_per_concept
    seeds = [sampling.seed + i for i in range(n)]
    result = {"presence": {}, "color_accuracy": {}, "samples": {}, "prompted_colors": {}}
    for shape in shapes:
        cols = [colors[i % len(colors)] for i in range(n)]
        prompts = [f"a photo of a {c} {shape}" for c in cols]
        images = sample_images(pipe, prompts, seeds, sampling.num_inference_steps, sampling.guidance_scale, sampling.batch_size, progress)
        verdict = classify(judge, images)
        result["presence"][shape] = presence(verdict.subject, shape)
        result["color_accuracy"][shape] = attribute_accuracy(verdict.color, cols)
        result["samples"][shape] = images
        result["prompted_colors"][shape] = cols
    return result
