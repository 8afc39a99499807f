"""Base-model pretraining on the toy world: the VAE, then the UNet (and optionally the text encoder).

Both loops follow the diffusers training examples: sample a batch, compute the loss, step the
optimizer, with a tqdm bar. The UNet learns the epsilon-prediction loss of DESIGN section 6,
``L = E || eps - eps_theta(sqrt(abar_t) z + sqrt(1 - abar_t) eps, t, tau(c)) ||^2``.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline
from diffusers.models.attention_processor import AttnProcessor
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from .config import PretrainConfig
from .data import ToyRecord, fresh_caption, to_model_range
from .models import encode_prompts, text_states


def train_vae(vae: AutoencoderKL, images: torch.Tensor, cfg: PretrainConfig, seed: int, progress: bool = True) -> list[float]:
    """Train the VAE to reconstruct ``images`` (uint8 N,3,H,W): MSE + ``vae_kl_weight`` * KL.
    Returns the loss per step. Ends by setting ``scaling_factor`` so latents have unit variance."""
    gen = torch.Generator().manual_seed(seed)
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0, fused=cfg.fused_optimizer or None)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.vae_steps, 1), eta_min=cfg.vae_lr * 0.05)
    losses = []
    bar = tqdm(range(cfg.vae_steps), desc="vae", disable=not progress)
    for _ in bar:
        # 1. a random batch in [-1, 1]
        idx = torch.randint(0, images.shape[0], (cfg.vae_batch_size,), generator=gen)
        x = to_model_range(images[idx])
        # 2. encode, sample a latent, decode
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        # 3. reconstruction plus a small KL pull towards N(0, I)
        loss = F.mse_loss(recon, x) + cfg.vae_kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
    vae.eval()
    latents = encode_latents(vae, images[: min(1024, images.shape[0])], scale=False)
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return losses


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 256, scale: bool = True) -> torch.Tensor:
    """Posterior means of ``images`` (uint8), times the VAE's scaling factor when ``scale``."""
    out = []
    for i in range(0, images.shape[0], batch_size):
        out.append(vae.encode(to_model_range(images[i : i + batch_size])).latent_dist.mean)
    z = torch.cat(out)
    return z * vae.config.scaling_factor if scale else z


class PromptCache:
    """Text-encoder outputs per distinct prompt, for pretraining with a frozen text encoder
    (``pretrain.train_text_encoder: false``): the toy world has only a few hundred distinct captions."""

    def __init__(self, pipe: StableDiffusionPipeline):
        self.pipe = pipe
        self.cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        new = sorted({p for p in prompts if p not in self.cache})
        if new:
            self.cache.update(zip(new, encode_prompts(self.pipe, new)))
        return torch.stack([self.cache[p] for p in prompts])


def weight_losses(per_sample: torch.Tensor, scheduler: DDPMScheduler, t: torch.Tensor, weighting: str = "none", snr_gamma: float = 5.0) -> torch.Tensor:
    """Per-sample epsilon losses at timesteps ``t`` weighted over timesteps (DESIGN section 6).

    ``"none"``: unchanged. ``"v"``: divided by ``abar_t``, which makes the weighted epsilon loss
    equal to the v-prediction loss of the same model: the epsilon loss alone gives almost no
    weight to high noise levels, where a small model must learn what the prompt asks for.
    ``"min_snr"``: Min-SNR-gamma (Hang et al. 2023; the diffusers training examples'
    ``--snr_gamma``), times ``min(SNR_t, gamma) / SNR_t`` with ``SNR_t = abar_t / (1 - abar_t)``."""
    if weighting == "none":
        return per_sample
    abar = scheduler.alphas_cumprod.to(device=per_sample.device, dtype=per_sample.dtype)[t]
    if weighting == "v":
        return per_sample / abar
    if weighting == "min_snr":
        snr = abar / (1 - abar)
        return per_sample * torch.clamp(snr, max=snr_gamma) / snr
    raise ValueError(f"unknown loss weighting {weighting!r}; use none, v or min_snr")


def diffusion_loss(
    unet, scheduler: DDPMScheduler, latents: torch.Tensor, text: torch.Tensor, generator: torch.Generator | None = None, weighting: str = "none",
    snr_gamma: float = 5.0,
) -> torch.Tensor:
    """The epsilon-prediction loss L(theta; batch) of DESIGN section 6 on one batch of latents,
    each sample's squared error weighted over timesteps by :func:`weight_losses` (``weighting``)."""
    noise = torch.randn(latents.shape, generator=generator)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator)
    noisy = scheduler.add_noise(latents, noise, t)
    pred = unet(noisy, t, text).sample
    per_sample = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
    return weight_losses(per_sample, scheduler, t, weighting, snr_gamma).mean()


def train_unet(
    pipe: StableDiffusionPipeline,
    latents: torch.Tensor,
    records: Sequence[ToyRecord],
    cfg: PretrainConfig,
    seed: int,
    progress: bool = True,
    caption_fn: Callable[[np.random.Generator, ToyRecord], str] | None = None,
    callback: Callable[[int, StableDiffusionPipeline], None] | None = None,
    callback_every: int = 0,
) -> list[float]:
    """Pretrain ``pipe.unet`` (and the text encoder when ``cfg.train_text_encoder``) on cached
    ``latents`` of ``records``, with fresh template captions each step (real concepts keep their prompts) and ``caption_dropout``
    empty captions for classifier-free guidance. The VAE stays frozen. The trained modules end
    holding their EMA weights. Returns the loss per step."""
    ddpm = DDPMScheduler.from_config(pipe.scheduler.config, variance_type="fixed_small")
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    caption_fn = caption_fn or fresh_caption
    unet, text_encoder = pipe.unet, pipe.text_encoder
    modules = [unet] + ([text_encoder] if cfg.train_text_encoder else [])
    params = [p for m in modules for p in m.parameters()]
    prompts = None if cfg.train_text_encoder else PromptCache(pipe)
    for m in modules:
        m.train()
    # The classic attention processor is ~13% faster than SDPA's CPU kernel for heads this
    # small; the saved model keeps its default processors.
    default_processors = unet.attn_processors
    unet.set_attn_processor(AttnProcessor())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=1e-2, fused=cfg.fused_optimizer or None)
    warm = max(cfg.unet_warmup_steps, 1)
    lr_lambda = lambda s: min(1.0, (s + 1) / warm) * (0.5 * (1 + math.cos(math.pi * min(s, cfg.unet_steps) / max(cfg.unet_steps, 1))) * 0.9 + 0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    ema = EMAModel(params, decay=cfg.ema_decay, foreach=cfg.fused_optimizer)
    losses = []
    bar = tqdm(range(cfg.unet_steps), desc="unet", disable=not progress)
    for step in bar:
        # 1. a batch of latents with fresh captions; some captions dropped for guidance
        idx = torch.randint(0, latents.shape[0], (cfg.unet_batch_size,), generator=gen)
        caps = ["" if rng.random() < cfg.caption_dropout else caption_fn(rng, records[i]) for i in idx.tolist()]
        if prompts is not None:
            text = prompts(caps)
        else:
            text = text_states(pipe, caps)
        # 2. the epsilon-prediction loss
        loss = diffusion_loss(unet, ddpm, latents[idx], text, gen, cfg.loss_weighting)
        # 3. optimizer, schedule and EMA
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema.step(params)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", refresh=False)
        if callback is not None and callback_every and (step + 1) % callback_every == 0:
            # evaluate the EMA weights, then put the live weights back
            ema.store(params)
            ema.copy_to(params)
            for m in modules:
                m.eval()
            callback(step + 1, pipe)
            for m in modules:
                m.train()
            ema.restore(params)
    ema.copy_to(params)
    unet.set_attn_processor(default_processors)
    for m in modules:
        m.eval()
    return losses
