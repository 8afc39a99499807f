"""A micro MIMA run for the resume test: ``python tests/resume_worker.py CHECKPOINT_DIR STEPS
[--resume] [--slow]``. Writes the final immunized tensors to CHECKPOINT_DIR/../final.safetensors."""

import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mci_lib import immunize as im  # noqa: E402
from mci_lib.artifacts import save_weights  # noqa: E402
from mci_lib.config import ImmunizeConfig  # noqa: E402
from mci_lib.merge import MergeFactor  # noqa: E402


def micro_unet() -> UNet2DConditionModel:
    """The micro UNet of the immunization tests (4x4 latents, 6-wide cross-attention), seed 0."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=4, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=2, cross_attention_dim=6, norm_num_groups=4,
    )


def build():
    unet = micro_unet()
    g = torch.Generator().manual_seed(1)

    def concept(name, n=6):
        return im.ConceptData(name, torch.randn(n, 4, 4, 4, generator=g), torch.randn(n, 5, 6, generator=g), torch.randn(2, 6, generator=g))

    concepts, prior = [concept("a"), concept("b")], concept("prior")
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    abar = torch.cumprod(1 - betas, 0)
    ctx = im.MergeContext(MergeFactor.from_embeddings(torch.randn(30, 6, generator=g, dtype=torch.float64), 1e-3), [c.target_rows for c in concepts])
    cfg = ImmunizeConfig(inner_lr=0.5, batch_size=2, outer_lr=1e-2, utility="distill", utility_weight=5.0, checkpoint_every=1)
    return unet, concepts, prior, abar, ctx, cfg


def run(checkpoint_dir, steps, resume=False, on_step=None):
    # one thread in the worker process and in the test process alike: bit-identical results need
    # the same thread count, and earlier tests may have changed the test process's
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        unet, concepts, prior, abar, ctx, cfg = build()
        cfg = replace(cfg, steps=steps, resume=resume)
        with im.double_backward_attention():
            result = im.run_mima(unet, concepts, prior, abar, cfg, ctx, seed=3, progress=False, on_step=on_step, checkpoint_dir=checkpoint_dir)
        return result.theta
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    folder, steps = Path(sys.argv[1]), int(sys.argv[2])
    slow = (lambda step, row: time.sleep(0.3)) if "--slow" in sys.argv else None
    theta = run(folder, steps, resume="--resume" in sys.argv, on_step=slow)
    save_weights(folder.parent / "final.safetensors", theta)
