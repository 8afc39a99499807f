"""Models: the tiny Stable-Diffusion-architecture pipeline, built from configs, and real SD v1.x
loaded from a local diffusers folder through the same function (DESIGN section 2).

The tiny pipeline has every part of Stable Diffusion v1: a ``UNet2DConditionModel`` with
cross-attention, an ``AutoencoderKL``, a CLIP text encoder and the real CLIP BPE tokenizer (built
offline from the vocabulary file shipped inside the ``open-clip-torch`` wheel), and DDPM/DDIM
schedulers with SD's ``scaled_linear`` betas. It is saved in the standard diffusers layout, so
stock ``StableDiffusionPipeline.from_pretrained(folder)`` loads it.
"""

from __future__ import annotations

import gzip
import os
import warnings
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .config import ModelConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a model hub from this library

CLIP_MERGES = 49152 - 256 - 2  # the number of BPE merges CLIP keeps (vocabulary 49408)
PIPELINE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1)) + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def build_clip_tokenizer(bpe_path: str | Path, max_length: int = 77) -> CLIPTokenizer:
    """The real CLIP BPE tokenizer from ``bpe_simple_vocab_16e6.txt.gz`` (the file inside the
    ``open-clip-torch`` wheel): 256 byte symbols, the same with ``</w>``, 48,894 merges, then the
    start and end tokens; ids match OpenAI CLIP and SD's tokenizer."""
    bpe_path = Path(bpe_path)
    if not bpe_path.is_file():
        raise FileNotFoundError(
            f"{bpe_path}: CLIP BPE vocabulary not found. Run `make setup` (it takes "
            "open_clip/bpe_simple_vocab_16e6.txt.gz out of the open-clip-torch wheel), or set paths.clip_vocab."
        )
    with gzip.open(bpe_path, "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : CLIP_MERGES + 1]]
    symbols = list(_bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def unet_config(cfg: ModelConfig, latent_size: int) -> dict:
    n = len(cfg.unet_channels)
    return dict(
        sample_size=latent_size,
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        block_out_channels=tuple(cfg.unet_channels),
        down_block_types=("CrossAttnDownBlock2D",) * n,
        up_block_types=("CrossAttnUpBlock2D",) * n,
        layers_per_block=cfg.unet_layers_per_block,
        attention_head_dim=cfg.attention_head_dim,
        cross_attention_dim=cfg.cross_attention_dim,
        norm_num_groups=min(32, min(cfg.unet_channels)),
    )


def vae_config(cfg: ModelConfig, image_size: int) -> dict:
    n = len(cfg.vae_channels)
    return dict(
        sample_size=image_size,
        in_channels=3,
        out_channels=3,
        block_out_channels=tuple(cfg.vae_channels),
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        latent_channels=cfg.latent_channels,
        layers_per_block=1,
        norm_num_groups=min(32, min(cfg.vae_channels)),
    )


def text_config(cfg: ModelConfig, vocab_size: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.text_hidden_size,
        intermediate_size=cfg.text_intermediate_size,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        max_position_embeddings=cfg.max_length,
        projection_dim=cfg.text_hidden_size,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )


def ddim_scheduler(cfg: ModelConfig) -> DDIMScheduler:
    """SD v1's sampling scheduler (DDIM, ``scaled_linear`` betas); training derives DDPM from its config."""
    return DDIMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def build_tiny_pipeline(cfg: ModelConfig, bpe_path: str | Path, image_size: int = 32, seed: int = 0) -> StableDiffusionPipeline:
    """A randomly initialised tiny SD-architecture pipeline (seeded), ready to pretrain."""
    if cfg.text_hidden_size != cfg.cross_attention_dim:
        raise ValueError(
            f"model.cross_attention_dim ({cfg.cross_attention_dim}) must equal model.text_hidden_size "
            f"({cfg.text_hidden_size}): the UNet attends to the text encoder's hidden states"
        )
    factor = 2 ** (len(cfg.vae_channels) - 1)
    if image_size % factor:
        raise ValueError(f"world.image_size {image_size} is not divisible by the VAE's downsampling {factor}")
    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(bpe_path, cfg.max_length)
    text_encoder = CLIPTextModel(text_config(cfg, len(tokenizer)))
    vae = AutoencoderKL(**vae_config(cfg, image_size))
    unet = UNet2DConditionModel(**unet_config(cfg, image_size // factor))
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=ddim_scheduler(cfg),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def check_model_folder(folder: str | Path) -> Path:
    """Fail early, naming what is missing, when ``folder`` is not a diffusers SD folder."""
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{folder}: not a diffusers model folder (no model_index.json). For Stable Diffusion, download "
            "a v1.x model in diffusers layout to this path (for example with `hf download` on a machine with "
            "network access) and set model.pretrained_dir; for the tiny model, run the data_prep stage."
        )
    for part in PIPELINE_PARTS:
        if not (folder / part).is_dir():
            raise FileNotFoundError(f"{folder}: the pipeline component folder '{part}/' is missing")
    return folder


ATTENTION = ("auto", "classic", "sdpa")


def set_attention(unet: UNet2DConditionModel, attention: str = "auto") -> str:
    """Choose how the UNet computes attention (the result is the same function up to float rounding):
    ``classic`` is diffusers' ``AttnProcessor`` (explicit ``softmax(Q K^T / sqrt(d)) V``), ``sdpa``
    its default ``AttnProcessor2_0`` (``scaled_dot_product_attention``), and ``auto`` picks classic
    when the UNet sits on the CPU, sdpa elsewhere. On the CPU, with the tiny model's 8-dimensional
    heads, the classic processor's training and MIMA steps are about 6% faster and sampling is the
    same (``benchmarks/attention.py``); on a GPU SDPA's fused kernels win and keep 512 px
    attention maps out of memory. Processors are not saved: a saved folder loads with diffusers' default.
    Returns the processor chosen."""
    if attention not in ATTENTION:
        raise ValueError(f"unknown attention {attention!r}; use one of {', '.join(ATTENTION)}")
    if attention == "auto":
        attention = "classic" if unet.device.type == "cpu" else "sdpa"
    unet.set_attn_processor(AttnProcessor() if attention == "classic" else AttnProcessor2_0())
    return attention


def load_pipeline(folder: str | Path, torch_dtype: torch.dtype = torch.float32, attention: str = "auto") -> StableDiffusionPipeline:
    """Load a tiny or real SD v1.x pipeline from a local diffusers folder (never from a hub), with
    the UNet's attention processor chosen by :func:`set_attention` (call it again after moving the
    pipeline to another device)."""
    folder = check_model_folder(folder)
    pipe = StableDiffusionPipeline.from_pretrained(
        str(folder),
        torch_dtype=torch_dtype,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        local_files_only=True,
    )
    pipe.set_progress_bar_config(disable=True)
    set_attention(pipe.unet, attention)
    return pipe


def save_pipeline(pipe: StableDiffusionPipeline, folder: str | Path) -> Path:
    """Save in the diffusers layout (safetensors), to a temporary folder renamed when complete."""
    from .artifacts import atomic_dir

    with atomic_dir(folder) as tmp:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
    return Path(folder)


def add_placeholder_tokens(pipe: StableDiffusionPipeline, tokens: list[str], init_word: str | None = None) -> list[int]:
    """Add placeholder tokens such as ``<p1>`` to tokenizer and text encoder; their embeddings
    start as ``init_word``'s embedding (or the mean embedding). Returns the new ids."""
    tokenizer, text_encoder = pipe.tokenizer, pipe.text_encoder
    existing = [t for t in tokens if t in tokenizer.get_vocab()]
    if existing:
        raise ValueError(f"placeholder token(s) {existing} already in the tokenizer; pick new names")
    tokenizer.add_tokens(list(tokens))
    ids = tokenizer.convert_tokens_to_ids(list(tokens))
    text_encoder.resize_token_embeddings(len(tokenizer))
    emb = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        if init_word is not None:
            init_ids = tokenizer(init_word, add_special_tokens=False).input_ids
            if len(init_ids) != 1:
                raise ValueError(f"init_word {init_word!r} must be a single token, got {len(init_ids)}")
            init = emb[init_ids[0]].clone()
        else:
            init = emb[: min(len(tokenizer) - len(tokens), emb.shape[0])].mean(0)
        for i in ids:
            emb[i] = init
    return ids


def text_states(pipe: StableDiffusionPipeline, prompts: list[str]) -> torch.Tensor:
    """Text-encoder hidden states (B, max_length, d) for ``prompts``, padded to max length as SD
    does, with gradient (for training the text encoder or a token embedding)."""
    limit = pipe.tokenizer.model_max_length
    long = [q for q in prompts if len(pipe.tokenizer(q).input_ids) > limit]
    if long:
        warnings.warn(f"{len(long)} prompt(s) exceed the tokenizer's {limit} tokens and are truncated, e.g. {long[0][:80]!r}...", stacklevel=2)
    return pipe.text_encoder(prompt_ids(pipe, prompts))[0]


def prompt_ids(pipe: StableDiffusionPipeline, prompts: list[str]) -> torch.Tensor:
    """The token ids (B, max_length) that :func:`text_states` encodes ``prompts`` from: padded to
    the tokenizer's max length and truncated there, on the text encoder's device."""
    limit = pipe.tokenizer.model_max_length
    tok = pipe.tokenizer(list(prompts), padding="max_length", max_length=limit, truncation=True, return_tensors="pt")
    return tok.input_ids.to(pipe.text_encoder.device)


@torch.no_grad()
def encode_prompts(pipe: StableDiffusionPipeline, prompts: list[str]) -> torch.Tensor:
    """:func:`text_states` without gradient."""
    return text_states(pipe, prompts)


# the attention projections a UNet LoRA adapts (the attack's peft target_modules, and the simulated
# LoRA attacker's set, immunize.inner_params: lora)
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def is_cross_attention_kv(name: str) -> bool:
    """Whether a UNet parameter name is a cross-attention key or value weight (what UCE edits and
    the merging layer merges)."""
    return ".attn2." in name and (name.endswith("to_k.weight") or name.endswith("to_v.weight"))


def cross_attention_projections(unet: UNet2DConditionModel) -> dict[str, torch.nn.Parameter]:
    """Every cross-attention (``attn2``) projection weight of the UNet, by parameter name."""
    return {n: p for n, p in unet.named_parameters() if ".attn2." in n and n.endswith("weight") and any(k in n for k in ("to_q", "to_k", "to_v", "to_out"))}
