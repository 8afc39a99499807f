"""Sampling with fixed seeds (DESIGN section 7): sample ``i`` always starts from the initial noise of
seed ``seed + i``, so two models (immunized and not, or before and after an attack) are compared
on the same starting points. The denoising loop is the stock ``StableDiffusionPipeline`` call with
a DDIM scheduler and classifier-free guidance."""

from __future__ import annotations

from typing import Sequence

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from tqdm.auto import tqdm


def initial_noise(pipe: StableDiffusionPipeline, seeds: Sequence[int]) -> torch.Tensor:
    """One latent noise tensor per seed, each drawn from its own generator (batch-independent)."""
    c = pipe.unet.config.in_channels
    s = pipe.unet.config.sample_size
    return torch.stack([torch.randn((c, s, s), generator=torch.Generator().manual_seed(int(k))) for k in seeds])


@torch.no_grad()
def sample_images(
    pipe: StableDiffusionPipeline,
    prompts: Sequence[str],
    seeds: Sequence[int],
    num_inference_steps: int = 25,
    guidance_scale: float = 4.0,
    batch_size: int = 64,
    progress: bool = False,
) -> torch.Tensor:
    """Generate one image per (prompt, seed) pair; returns uint8 (N, 3, H, W)."""
    if len(prompts) != len(seeds):
        raise ValueError(f"sample_images: {len(prompts)} prompts but {len(seeds)} seeds")
    if not isinstance(pipe.scheduler, DDIMScheduler):
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    device = pipe.unet.device
    dtype = pipe.unet.dtype
    out = []
    for i in tqdm(range(0, len(prompts), batch_size), desc="sampling", disable=not progress):
        noise = initial_noise(pipe, seeds[i : i + batch_size]).to(device, dtype)
        images = pipe(
            list(prompts[i : i + batch_size]),
            latents=noise,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            output_type="pt",
        ).images
        out.append((images.clamp(0, 1) * 255).round().to(torch.uint8).cpu())
    return torch.cat(out)
