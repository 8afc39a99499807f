"""Synthetic immunization inputs for the step-timing benchmarks (``attention.py``,
``immunize_step.py``, ``mixed_precision.py``): random latents, text states and target rows of the
tiny model's shapes, so that a step's cost is measured without the toy world on disk."""

from __future__ import annotations

import torch

from mci_lib import immunize as im
from mci_lib.config import ImmunizeConfig, Params
from mci_lib.merge import MergeFactor


def synthetic_inputs(p: Params, unet: torch.nn.Module, cfg: ImmunizeConfig, n: int, g: torch.Generator) -> tuple[list[im.ConceptData], im.ConceptData, MergeFactor]:
    """``n`` concepts and a prior of 16 samples each (12 target rows per concept), and the merge's
    factor over ``cfg.reg_captions`` random captions, drawn from ``g`` in that order."""
    d, L, s = p.model.cross_attention_dim, p.model.max_length, unet.config.sample_size

    def concept(i: int) -> im.ConceptData:
        return im.ConceptData(f"c{i}", torch.randn(16, 4, s, s, generator=g), torch.randn(16, L, d, generator=g), torch.randn(12, d, generator=g))

    concepts = [concept(i) for i in range(n)]
    prior = concept(99)
    factor = MergeFactor.from_embeddings(torch.randn(cfg.reg_captions * L, d, generator=g).double(), cfg.merge_delta)
    return concepts, prior, factor


def merge_context(factor: MergeFactor, concepts: list[im.ConceptData], cfg: ImmunizeConfig) -> im.MergeContext:
    """The merge context of ``concepts`` over a synthetic factor, with ``cfg``'s merge form."""
    return im.MergeContext(factor, [c.target_rows.double() for c in concepts], cfg.merge, cfg.merge_lam)
