"""Base-model pretraining: the fused optimizer knob changes the kernels, not the update."""

from __future__ import annotations

from dataclasses import replace

import pytest
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


def test_loss_weightings_against_hand_computed_weights():
    from diffusers import DDPMScheduler

    ddpm = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    t = torch.tensor([0, 500, 999])
    losses = torch.tensor([1.0, 2.0, 3.0])
    abar = ddpm.alphas_cumprod[t]
    snr = abar / (1 - abar)
    assert snr[0] > 5 and snr[2] < 5  # one timestep on each side of gamma
    assert torch.equal(pretrain.weight_losses(losses, ddpm, t, "none"), losses)
    torch.testing.assert_close(pretrain.weight_losses(losses, ddpm, t, "v"), losses / abar)
    expected = torch.tensor([1.0 * 5 / snr[0].item(), 2.0 * min(snr[1].item(), 5) / snr[1].item(), 3.0])
    torch.testing.assert_close(pretrain.weight_losses(losses, ddpm, t, "min_snr", snr_gamma=5.0), expected)
    with pytest.raises(ValueError, match="none, v or min_snr"):
        pretrain.weight_losses(losses, ddpm, t, "snr")
