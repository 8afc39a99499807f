"""Base-model pretraining: the fused optimizer knob changes the kernels, not the update."""

from __future__ import annotations

from dataclasses import replace

import torch

from mci_lib import models, pretrain


def _prediction(pipe) -> torch.Tensor:
    """The UNet's noise prediction and the VAE's reconstruction on fixed inputs."""
    gen = torch.Generator().manual_seed(1)
    size = pipe.unet.config.sample_size
    noisy = torch.randn((2, pipe.unet.config.in_channels, size, size), generator=gen)
    image = torch.rand((1, 3, size * 4, size * 4), generator=gen) * 2 - 1
    with torch.no_grad():
        eps = pipe.unet(noisy, torch.tensor([10, 900]), models.encode_prompts(pipe, ["a photo of a red circle", ""])).sample
        recon = pipe.vae.decode(pipe.vae.encode(image).latent_dist.mean).sample
    return torch.cat([eps.flatten(), recon.flatten()])


def _trained(params, fused: bool, steps: int):
    cfg = replace(params.pretrain, unet_steps=steps, vae_steps=steps, unet_warmup_steps=1, fused_optimizer=fused)
    pipe = models.build_tiny_pipeline(params.model, params.paths.clip_vocab, params.world.image_size, seed=0)
    images = torch.randint(0, 256, (8, 3, params.world.image_size, params.world.image_size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    pretrain.train_vae(pipe.vae, images, cfg, seed=0, progress=False)
    latents = pretrain.encode_latents(pipe.vae, images)
    pretrain.train_unet(pipe, latents, list(range(len(images))), cfg, seed=0, progress=False, caption_fn=lambda rng, r: f"a photo of a red circle {r}")
    return pipe


def test_fused_optimizer_trains_the_same_model(micro_params):
    start = _prediction(_trained(micro_params, fused=False, steps=0))
    # two steps each: the same gradients up to rounding. The weights themselves are not compared:
    # a bias in front of a group norm gets a gradient of pure rounding noise, which Adam scales up
    # to a full step either way, and that bias does not change what the model computes.
    plain = _prediction(_trained(micro_params, fused=False, steps=2))
    fused = _prediction(_trained(micro_params, fused=True, steps=2))
    moved = (plain - start).abs().max().item()
    assert moved > 1e-3  # training changed what the model computes ...
    assert (fused - plain).abs().max().item() < 1e-3 * moved  # ... and the fused kernels changed it the same way
