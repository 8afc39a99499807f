"""Attacks (DESIGN section 7): what a user does with released weights to get a concept back.

Every attack is one call with one signature::

    for step, pipe in attack(kind, model_dir, concepts, budget, seed, checkpoints): ...

It loads the released model exactly as a user would (the saved diffusers folder, through stock
``StableDiffusionPipeline.from_pretrained``), fine-tunes it on the attacker's images the way the
diffusers training examples do (VAE latents, DDPM noise, the epsilon-prediction loss, AdamW), and
yields the live pipeline, in eval mode, at each checkpoint step of the schedule (step 0 first, the
unattacked model). It never sees the immunization's internals.

Kinds:
- ``full``: every UNet weight (the re-learning attack);
- ``lora``: a peft LoRA of rank ``budget.lora_rank`` on the UNet's attention projections;
- ``dreambooth``: the full UNet on the instance prompt, with prior preservation on class images
  sampled from the attacked model itself;
- ``dreambooth_lora``: the same with LoRA;
- ``textual_inversion``: one new token's embedding only;
- ``custom_diffusion``: cross-attention K/V plus a new modifier token, with prior preservation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline
from peft import LoraConfig
from tqdm.auto import tqdm

from .config import ATTACKS, AttackConfig
from .data import PERSONAL_SUBJECTS, load_images, select
from .models import add_placeholder_tokens, is_cross_attention_kv, load_pipeline, text_states
from .pretrain import diffusion_loss, encode_latents
from .sampling import sample_images

PRIOR_ATTACKS = ("dreambooth", "dreambooth_lora", "custom_diffusion")
TOKEN_ATTACKS = ("textual_inversion", "custom_diffusion")
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@dataclass
class AttackData:
    """One concept as the attacker has it: images and their captions. Personalization concepts
    also name their placeholder ``token`` (e.g. ``<p1>``, written into the captions), the
    ``class_word`` it starts from and the ``class_prompt`` used for prior preservation."""

    name: str
    images: torch.Tensor  # uint8 (n, 3, H, W)
    captions: list[str]
    token: str | None = None
    class_word: str | None = None
    class_prompt: str | None = None
    identifier: str | None = None  # what non-token attacks write in place of ``token``

    def captions_for(self, kind: str) -> list[str]:
        """The captions attack ``kind`` trains on: the placeholder token for token attacks,
        DreamBooth's rare-token identifier for the others (a multi-piece ``<p1>`` written as
        plain text would tokenize almost like ``<p2>`` and blend the subjects)."""
        return prompts_for(kind, self.captions, self.token, self.identifier)

    def __post_init__(self):
        if self.images.shape[0] == 0:
            raise ValueError(f"attack data for {self.name!r} has no images")
        if len(self.captions) != self.images.shape[0]:
            raise ValueError(f"attack data for {self.name!r}: {self.images.shape[0]} images but {len(self.captions)} captions")


@dataclass(frozen=True)
class Budget:
    """One point of the attacker's budget: learning rate, steps, LoRA rank."""

    lr: float
    steps: int
    lora_rank: int = 4


def default_budget(kind: str, cfg: AttackConfig) -> Budget:
    """The default budget of ``kind`` from ``params.yaml`` (``attack.lr.<kind>``, ``attack.steps``)."""
    check_kind(kind)
    return Budget(getattr(cfg.lr, kind), cfg.steps, cfg.lora_rank)


def prompts_for(kind: str, prompts: Sequence[str], token: str | None, identifier: str | None) -> list[str]:
    """``prompts`` as attack ``kind`` writes them: ``token`` replaced by ``identifier`` for the
    attacks that add no token."""
    if token and identifier and kind not in TOKEN_ATTACKS:
        return [q.replace(token, identifier) for q in prompts]
    return list(prompts)


def check_kind(kind: str) -> None:
    if kind not in ATTACKS:
        raise ValueError(f"unknown attack {kind!r}; known: {', '.join(ATTACKS)}")


def _trainable(pipe: StableDiffusionPipeline, kind: str, budget: Budget) -> list[torch.nn.Parameter]:
    """Switch on gradients for exactly what ``kind`` trains and return those parameters."""
    unet, text_encoder = pipe.unet, pipe.text_encoder
    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    pipe.vae.requires_grad_(False)
    if kind in ("full", "dreambooth"):
        unet.requires_grad_(True)
        return list(unet.parameters())
    if kind in ("lora", "dreambooth_lora"):
        # the diffusers LoRA examples' setting: gaussian init, alpha = rank, attention projections
        unet.add_adapter(LoraConfig(r=budget.lora_rank, lora_alpha=budget.lora_rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
        return [p for p in unet.parameters() if p.requires_grad]
    embedding = text_encoder.get_input_embeddings().weight
    embedding.requires_grad_(True)
    if kind == "textual_inversion":
        return [embedding]
    kv = [p for n, p in unet.named_parameters() if is_cross_attention_kv(n)]
    for p in kv:
        p.requires_grad_(True)
    return kv + [embedding]


def _class_images(pipe: StableDiffusionPipeline, concepts: Sequence[AttackData], cfg: AttackConfig, sampling, seed: int) -> list[tuple[torch.Tensor, list[str]]]:
    """DreamBooth's prior data: ``cfg.class_images`` images of each class prompt sampled from the
    attacked model before it is touched (the DreamBooth example's ``--with_prior_preservation``)."""
    out = []
    for k, c in enumerate(concepts):
        if not c.class_prompt:
            raise ValueError(f"attack data for {c.name!r} has no class_prompt; prior preservation needs one")
        seeds = [seed * 100_003 + k * 10_007 + i for i in range(cfg.class_images)]
        images = sample_images(pipe, [c.class_prompt] * len(seeds), seeds, sampling.num_inference_steps, sampling.guidance_scale, sampling.batch_size)
        out.append((images, [c.class_prompt] * len(seeds)))
    return out


def attack(
    kind: str,
    model_dir,
    concepts: Sequence[AttackData],
    budget: Budget,
    cfg: AttackConfig,
    sampling,
    seed: int,
    checkpoints: Sequence[int],
    progress: bool = True,
) -> Iterator[tuple[int, StableDiffusionPipeline]]:
    """Fine-tune the model in ``model_dir`` on ``concepts`` (all at once, one shuffled stream) with
    attack ``kind`` for ``budget.steps`` steps; yield ``(step, pipe)`` at step 0 and at every step
    of ``checkpoints`` (the pipeline is live: use it before asking for the next checkpoint)."""
    check_kind(kind)
    if not concepts:
        raise ValueError("attack: no concepts given")
    if budget.steps < 1 or budget.lr <= 0:
        raise ValueError(f"attack budget must have steps >= 1 and lr > 0, got {budget}")
    schedule = sorted({s for s in checkpoints if 0 < s <= budget.steps} | {budget.steps})
    # 1. load the released model as a user would
    pipe = load_pipeline(model_dir)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    ddpm = DDPMScheduler.from_config(pipe.scheduler.config)
    # 2. placeholder tokens for the token attacks (DreamBooth uses the identifier as plain text)
    token_ids: list[int] = []
    if kind in TOKEN_ATTACKS:
        for c in concepts:
            if not c.token or not c.class_word:
                raise ValueError(f"{kind} needs a placeholder token and class word for {c.name!r}")
            token_ids += add_placeholder_tokens(pipe, [c.token], init_word=c.class_word)
    # 3. prior-preservation data, sampled before training
    prior = _class_images(pipe, concepts, cfg, sampling, seed) if kind in PRIOR_ATTACKS else []
    instance_latents = [encode_latents(pipe.vae, c.images) for c in concepts]
    prior_latents = [(encode_latents(pipe.vae, im), caps) for im, caps in prior]
    yield 0, pipe
    # 4. the trainable set and its optimizer
    params = _trainable(pipe, kind, budget)
    embedding = pipe.text_encoder.get_input_embeddings().weight
    frozen_rows = embedding.detach().clone() if kind in TOKEN_ATTACKS else None
    keep = torch.ones(embedding.shape[0], dtype=torch.bool)
    keep[token_ids] = False
    opt = torch.optim.AdamW(params, lr=budget.lr, weight_decay=0.0 if kind in TOKEN_ATTACKS else 1e-2)
    pipe.unet.train()
    captions = [c.captions_for(kind) for c in concepts]
    n_total = sum(len(c) for c in captions)
    owners = np.concatenate([np.full(len(c.captions), k) for k, c in enumerate(concepts)])
    rows = np.concatenate([np.arange(len(c.captions)) for c in concepts])
    bar = tqdm(range(1, budget.steps + 1), desc=f"attack {kind}", disable=not progress)
    for step in bar:
        # 5. a batch of instance images from every concept's pool, plus the same number of class images
        pick = rng.choice(n_total, size=min(cfg.batch_size, n_total), replace=False)
        lat = torch.stack([instance_latents[owners[i]][rows[i]] for i in pick])
        caps = [captions[owners[i]][rows[i]] for i in pick]
        loss = diffusion_loss(pipe.unet, ddpm, lat, text_states(pipe, caps), gen)
        if prior_latents:
            k = rng.integers(len(prior_latents))
            plat, pcaps = prior_latents[k]
            j = rng.choice(plat.shape[0], size=min(cfg.batch_size, plat.shape[0]), replace=False)
            loss = loss + cfg.prior_weight * diffusion_loss(pipe.unet, ddpm, plat[j], text_states(pipe, [pcaps[i] for i in j]), gen)
        # 6. the optimizer step; token attacks keep every embedding row but the new tokens'
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if frozen_rows is not None:
            with torch.no_grad():
                embedding[keep] = frozen_rows[keep]
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if step in schedule:
            pipe.unet.eval()
            yield step, pipe
            pipe.unet.train()
    pipe.unet.eval()


@dataclass
class EvalConcept:
    """How a concept is scored at each checkpoint: the prompts to sample (one per seed), and the
    judge features of its ``reference`` images for ``sim``."""

    name: str
    prompts: list[str]
    reference_features: torch.Tensor
    token: str | None = None
    identifier: str | None = None


def score_attack(
    kind: str,
    model_dir,
    concepts: Sequence[AttackData],
    evals: Sequence[EvalConcept],
    judge,
    budget: Budget,
    cfg: AttackConfig,
    sampling,
    seed: int,
    checkpoints: Sequence[int],
    keep_images: int = 8,
    progress: bool = False,
    step0_cache: dict | None = None,
) -> tuple[list[dict], dict]:
    """Run one attack and score every concept at every checkpoint (step 0 included) on fixed
    sampling seeds (``sampling.seed + i``, the same for every model, so immunized and
    non-immunized models start from the same noise). Returns one row per (step, concept) with
    ``presence`` and ``sim``, and the first ``keep_images`` samples per (step, concept)."""
    from .metrics import concept_scores

    rows, images = [], {}
    cache = {} if step0_cache is None else step0_cache
    for step, pipe in attack(kind, model_dir, concepts, budget, cfg, sampling, seed, checkpoints, progress):
        for e in evals:
            prompts = prompts_for(kind, e.prompts, e.token, e.identifier)
            seeds = [sampling.seed + i for i in range(len(prompts))]
            # step 0 is the untouched model: the same for every seed and every attack that adds no token
            key = (str(model_dir), kind in TOKEN_ATTACKS, e.name)  # prompts_for depends on kind through this alone
            if step == 0 and key in cache:
                s = cache[key]
            else:
                s = concept_scores(pipe, judge, prompts, e.name, e.reference_features, sampling, seeds)
                if step == 0:
                    cache[key] = s
            rows.append({"attack": kind, "seed": seed, "step": step, "concept": e.name, "presence": s["presence"], "sim": s["sim"],
                         "lr": budget.lr, "lora_rank": budget.lora_rank})
            images[(step, e.name)] = s["images"][:keep_images]
    return rows, images


def concept_prompts(subject: str, colors: Sequence[str], n: int) -> list[str]:
    """The prompts a concept is sampled with: "a photo of a <color> <shape>" with the colors
    cycling, or for a personal subject the attacker's instance prompt "a photo of <p1> badge"."""
    if subject in PERSONAL_SUBJECTS:
        p = PERSONAL_SUBJECTS[subject]
        return [f"a photo of {p['token']} {p['class_word']}"] * n
    return [f"a photo of a {colors[i % len(colors)]} {subject}" for i in range(n)]


def toy_attack_data(data_dir, records, world, targets: Sequence[str], split: str = "attack") -> list[AttackData]:
    """The attacker's data in the toy world: each target's ``attack`` split, captioned as the
    concept's prompts are (a shape with its color; a personal subject with its placeholder token,
    class word and class prompt for prior preservation)."""
    out = []
    for target in targets:
        recs = select(records, split, target)
        if not recs:
            raise ValueError(f"attack target {target!r} has no {split!r} images in {data_dir}; known subjects: {sorted({r.subject for r in records})}")
        images = load_images(data_dir, recs)
        if target in PERSONAL_SUBJECTS:
            p = PERSONAL_SUBJECTS[target]
            caps = concept_prompts(target, world.colors, len(recs))
            out.append(AttackData(target, images, caps, p["token"], p["class_word"], f"a photo of a {p['class_word']}", p["identifier"]))
        else:
            out.append(AttackData(target, images, [f"a photo of a {r.color} {target}" for r in recs]))
    return out


def toy_eval_concepts(judge, data_dir, records, world, subjects: Sequence[str], n: int) -> list[EvalConcept]:
    """Scoring inputs for ``subjects``: ``n`` prompts each and the judge features of the
    ``reference`` split."""
    from .judge import classify

    out = []
    for subject in subjects:
        recs = select(records, "reference", subject)
        if not recs:
            raise ValueError(f"{subject!r} has no reference images in {data_dir}")
        personal = PERSONAL_SUBJECTS.get(subject, {})
        out.append(EvalConcept(subject, concept_prompts(subject, world.colors, n), classify(judge, load_images(data_dir, recs)).features,
                               personal.get("token"), personal.get("identifier")))
    return out


def run_suite(
    kinds: Sequence[str],
    models: dict,
    concepts: Sequence[AttackData],
    evals: Sequence[EvalConcept],
    judge,
    cfg: AttackConfig,
    sampling,
    seeds: Sequence[int],
    budgets: dict[str, Sequence[Budget]] | None = None,
    progress: bool = True,
) -> tuple[list[dict], dict]:
    """Every attack in ``kinds`` at each of its budgets (default: the params' default point)
    against every model in ``models`` (name -> diffusers folder; include the model without
    immunization), for every seed. Returns all scored rows (with ``method`` = the model's name)
    and the kept samples by (attack, method, seed, lr, rank, step, concept)."""
    budgets = budgets or {k: [default_budget(k, cfg)] for k in kinds}
    runs = [(k, b, m, s) for k in kinds for b in budgets[k] for m in models for s in seeds]
    rows, images, cache = [], {}, {}
    for kind, budget, method, seed in tqdm(runs, desc="attack runs", disable=not progress):
        r, im = score_attack(kind, models[method], concepts, evals, judge, budget, cfg, sampling, seed, cfg.checkpoints, step0_cache=cache)
        rows += [{**row, "method": method} for row in r]
        images.update({(kind, method, seed, budget.lr, budget.lora_rank, *key): v for key, v in im.items()})
    return rows, images


def sample_tensors(images: dict, cfg: AttackConfig) -> dict[str, torch.Tensor]:
    """The kept samples of :func:`run_suite` at each attack's default budget, keyed
    ``"<attack>/<method>/seed<seed>/step<step>/<concept>"`` (uint8 [n, 3, H, W]): the layout of
    ``reports/figures/attack_<threat>/samples.safetensors`` that the concept explorer reads."""
    out = {}
    for (kind, method, seed, lr, rank, step, concept), v in images.items():
        budget = default_budget(kind, cfg)
        if lr == budget.lr and rank == budget.lora_rank:
            out[f"{kind}/{method}/seed{seed}/step{step}/{concept}"] = v.contiguous()
    return out


def sweep_budgets(cfg: AttackConfig, kinds: Sequence[str]) -> dict[str, list[Budget]]:
    """The attacker-budget grid of ``kinds``: learning-rate scales x LoRA ranks (rank only for
    LoRA attacks); the steps axis is read off the checkpoints of each run."""
    grid = {}
    for kind in kinds:
        base = default_budget(kind, cfg)
        ranks = cfg.sweep_lora_ranks if kind in ("lora", "dreambooth_lora") else (cfg.lora_rank,)
        grid[kind] = [Budget(base.lr * scale, cfg.steps, rank) for scale in cfg.sweep_lr_scales for rank in ranks]
    return grid
