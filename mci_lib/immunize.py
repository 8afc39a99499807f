"""Immunization: IMMA for one concept, MIMA for N concepts, and their baselines (DESIGN section 6).

MIMA's outer step, with immunized parameters theta and a simulated attacker on the set S_l::

    for n in 1..N:   theta'_n = theta - alpha * update(grad_{S_l} [L(theta; D_n) + lambda_pr L(theta; P_n)])
    theta_m = Merge(theta'_1..theta'_N)      # closed-form merge on cross-attention K/V, mean elsewhere
    loss    = - sum_n L(theta_m; D_n) + lambda_pr sum_n L(theta; P_n)

Every evaluation goes through ``torch.func.functional_call`` with explicit parameter dicts, so the
simulated attacker never writes into the module or into the tensors it was handed. Modes:

- ``second_order``: the inner gradient keeps its graph (``create_graph=True``); the outer gradient
  flows through the merge *and* through theta'_n(theta), including the Hessian term. With
  ``second_order_steps`` k > 0 of ``inner_steps`` K (truncated unrolling), only the last k attacker
  steps keep their graph; the first K - k steps' gradients are constants, as in ``first_order``.
- ``first_order``: the inner gradient is a constant; the outer gradient flows through the merge
  (and the identity part of theta'_n) only.
- ``alternating``: the released reference code's dynamic: the merged attacker update is written
  into theta with no graph, then an ordinary outer step is taken on the next batch.

IMMA is MIMA with one concept and no merge; ``imma_joint`` runs it on the union of all concepts'
data, ``imma_sequential`` on one concept after another with the same total number of steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call
from tqdm.auto import tqdm

from .artifacts import checkpoint_step, load_training_state, save_training_state
from .config import PER_THREAT, ImmunizeConfig
from .data import PERSONAL_SUBJECTS, concept_word, fresh_caption, load_images, real_prompts, select
from .erase import token_rows
from .merge import HardMergePlan, MergeFactor, hard_merge, merge_residual, soft_merge
from .models import LORA_TARGETS, encode_prompts, is_cross_attention_kv as is_kv, prompt_ids

Params = dict[str, torch.Tensor]

# the simulated attacker's learned word embeddings are keyed "token:<token id>" beside its UNet
# tensors, and the LoRA attacker's factors of weight <name> "lora_A:<name>" and "lora_B:<name>"
TOKEN_PREFIX = "token:"
LORA_A, LORA_B = "lora_A:", "lora_B:"


class TokenInputs:
    """What an attacker that learns word embeddings needs for one concept's captions
    (``immunize.inner_params`` ``token`` or ``<set>+token``): their token ids, the ids of the concept
    words whose input embeddings it learns, and the text encoder, frozen, that turns the ids into
    the UNet's conditioning with those embeddings swapped in."""

    def __init__(self, ids: torch.Tensor, words: Sequence[int], text_encoder: torch.nn.Module):
        self.ids = ids  # (n, L), as mci_lib.models.prompt_ids tokenizes
        self.words = tuple(sorted(set(int(w) for w in words)))
        self.text_encoder = text_encoder
        table = text_encoder.get_input_embeddings().weight
        self.table_name = next(n for n, p in text_encoder.named_parameters() if p is table)
        # detached: the outer backward must not reach (or accumulate into) the text encoder
        self.frozen = {n: p.detach() for n, p in text_encoder.named_parameters()}

    def start(self) -> Params:
        """The attacker's starting vectors: the concept words' current embeddings, as fresh leaves."""
        table = self.frozen[self.table_name]
        return {f"{TOKEN_PREFIX}{w}": table[w].clone().requires_grad_(True) for w in self.words}

    def states(self, ids: torch.Tensor, vectors: Params) -> torch.Tensor:
        """Text-encoder states of ``ids`` with each ``vectors`` entry as its word's input embedding
        (differentiable in the vectors)."""
        rows = torch.tensor([int(k[len(TOKEN_PREFIX) :]) for k in vectors], device=ids.device)
        table = self.frozen[self.table_name].index_put((rows,), torch.stack(list(vectors.values())))
        return functional_call(self.text_encoder, {**self.frozen, self.table_name: table}, (ids,))[0]

    def union(self, other: "TokenInputs") -> "TokenInputs":
        if other.text_encoder is not self.text_encoder:
            raise ValueError("token inputs of two text encoders cannot be joined")
        return TokenInputs(torch.cat([self.ids, other.ids]), self.words + other.words, self.text_encoder)


@dataclass
class ConceptData:
    """One concept's defense data: VAE latents and text-encoder states of their captions, and the
    target token rows (from the concept word on, ``immunize.merge_rows``) that enter the merge's
    constraint; ``tokens``, the captions' token ids for an attacker that learns the concept words'
    embeddings (None: that attacker cannot run on this data)."""

    name: str
    latents: torch.Tensor  # (n, c, h, w), scaled
    text: torch.Tensor  # (n, L, d), one caption per latent
    target_rows: torch.Tensor  # (t, d)
    tokens: TokenInputs | None = None


@dataclass
class Batch:
    """A fixed diffusion batch: the loss on it is a deterministic function of the weights (and,
    with ``tokens``, of the word embeddings its ``ids`` are encoded with)."""

    latents: torch.Tensor
    text: torch.Tensor
    noise: torch.Tensor
    t: torch.Tensor
    ids: torch.Tensor | None = None
    tokens: TokenInputs | None = None


def make_batch(latents: torch.Tensor, text: torch.Tensor, batch_size: int, num_timesteps: int, gen: torch.Generator, tokens: TokenInputs | None = None) -> Batch:
    # drawn on the CPU generator, then moved: the same batch on every device
    idx = torch.randint(0, latents.shape[0], (batch_size,), generator=gen)
    noise = torch.randn(latents[idx].shape, generator=gen, dtype=latents.dtype).to(latents.device)
    t = torch.randint(0, num_timesteps, (batch_size,), generator=gen).to(latents.device)
    ids = None if tokens is None else tokens.ids[idx.to(tokens.ids.device)]
    return Batch(latents[idx], text[idx], noise, t, ids, tokens)


def learns_token(inner_params: str) -> bool:
    """Whether the simulated attacker's set (``immunize.inner_params``) includes word embeddings."""
    return inner_params == "token" or inner_params.endswith("+token")


def learns_lora(inner_params: str) -> bool:
    """Whether the simulated attacker trains low-rank factors (``immunize.inner_params`` ``lora``)."""
    return inner_params.removesuffix("+token") == "lora"


def _lora_start(params: Params, names: Sequence[str], rank: int, seed: int = 0) -> Params:
    """The LoRA attacker's factors for each weight in ``names`` (out x in), as peft's gaussian
    init: ``A`` (rank x in) normal with std 1/rank from ``seed``, and ``B`` (out x rank) zero, so
    the attacker starts at the weights themselves. With ``immunize.inner_lora_start: fixed`` the
    seed is 0 at every outer step, so the outer loop meets one rank-r subspace; with ``per_step``
    it comes from the step's batch (:func:`_batch_seed`), a fresh ``A`` per step as each real
    LoRA attack draws its own."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for n in names:
        W = params[n]
        A = torch.randn(rank, W.shape[1], generator=gen, dtype=torch.float64) / rank
        out[f"{LORA_A}{n}"] = A.to(W.device, W.dtype).requires_grad_(True)
        out[f"{LORA_B}{n}"] = torch.zeros(W.shape[0], rank, device=W.device, dtype=W.dtype, requires_grad=True)
    return out


def _batch_seed(batch: Batch) -> int:
    """A seed that is a function of ``batch`` alone (its timesteps): different at every outer step,
    the same whenever the same batch is evaluated again (so the objective stays deterministic)."""
    t = batch.t.detach().cpu().long()
    return int((t * torch.arange(1, t.numel() + 1)).sum()) * 1_000_003 + int(t[0])


def _split_tokens(phi: Params, params: Params | None = None) -> tuple[Params, Params]:
    """An attacker's tensors split into its UNet tensors and its word embeddings; LoRA factors
    (which need the starting ``params``) become the weights they adapt, ``W + B A`` (peft's
    scale alpha / r is 1, as the attack sets lora_alpha = r)."""
    unet = {n: v for n, v in phi.items() if not n.startswith((TOKEN_PREFIX, LORA_A, LORA_B))}
    for n in phi:
        if n.startswith(LORA_A):
            name = n[len(LORA_A) :]
            unet[name] = params[name] + phi[f"{LORA_B}{name}"] @ phi[n]
    return unet, {n: v for n, v in phi.items() if n.startswith(TOKEN_PREFIX)}


def with_tokens(batch: Batch, vectors: Params) -> Batch:
    """``batch`` with its conditioning re-encoded from its token ids with the learned word
    embeddings ``vectors``; unchanged when there are none."""
    if not vectors:
        return batch
    if batch.tokens is None:
        raise ValueError("immunize.inner_params learns word embeddings (+token), but this concept's data has no token ids; build it with concept_data")
    return dataclasses.replace(batch, text=batch.tokens.states(batch.ids, vectors))


def diffusion_loss_at(unet: torch.nn.Module, params: Params, batch: Batch, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """``L(theta; batch)``: the epsilon-prediction loss with the UNet evaluated at ``params``."""
    return diffusion_losses_at(unet, params, [batch], alphas_cumprod)[0]


def predictions_at(unet: torch.nn.Module, params: Params, batches: Sequence[Batch], alphas_cumprod: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The UNet's noise predictions at ``params`` on the concatenated ``batches`` (one call: every
    UNet layer is per-sample, so this equals separate calls at a fraction of the per-call overhead
    of the small batches immunization uses), and the true noise."""
    latents = torch.cat([b.latents for b in batches])
    noise = torch.cat([b.noise for b in batches])
    t = torch.cat([b.t for b in batches])
    abar = alphas_cumprod.to(latents.dtype)[t].view(-1, 1, 1, 1)
    noisy = abar.sqrt() * latents + (1 - abar).sqrt() * noise
    return functional_call(unet, params, (noisy, t, torch.cat([b.text for b in batches]))).sample, noise


def _linear_layers(unet: torch.nn.Module, names: Sequence[str]) -> list[str] | None:
    """The ``nn.Linear`` modules that own the tensors ``names``, or None when one of them is not the
    weight or bias of a layer of exactly that type (subclasses, such as peft's LoRA layers, run as
    separate calls). Linear only: batching pays where the groups share most of the network (the
    K/V attacker); with the whole UNet differing, splitting every convolution and norm as well
    measured no faster than separate calls (1.34-1.58 s per re-learning step either way,
    benchmarks/immunize_step.py's setup, session 23)."""
    layers = []
    for name in names:
        module_name, _, attr = name.rpartition(".")
        if attr not in ("weight", "bias") or type(unet.get_submodule(module_name)) is not torch.nn.Linear:
            return None
        if module_name not in layers:
            layers.append(module_name)
    return layers


def _grouped_linear(x: torch.Tensor, weights: Sequence[tuple[torch.Tensor, torch.Tensor | None]], sizes: Sequence[int]) -> torch.Tensor:
    """A linear layer on consecutive sample groups of ``x``, group k with its own ``weights[k]``."""
    if x.shape[0] != sum(sizes):
        raise ValueError(f"grouped linear layer: input batch {x.shape[0]} is not the groups' {sum(sizes)} samples")
    return torch.cat([F.linear(part, w, b) for part, (w, b) in zip(x.split(list(sizes)), weights)])


@contextlib.contextmanager
def _per_group_layers(unet: torch.nn.Module, layers: Sequence[str], groups: Sequence[Params], sizes: Sequence[int]):
    """Within the block, each module in ``layers`` applies group k's weight and bias (from
    ``groups[k]``, the module's own where a group leaves one out) to the k-th ``sizes[k]`` samples
    of its input; leaving it restores each module's own ``forward`` (an instance one included)."""
    saved: dict[int, tuple[torch.nn.Module, object]] = {}
    try:
        for name in layers:
            module = unet.get_submodule(name)
            if id(module) in saved:  # one module under two names: patched once
                continue
            own = {attr: getattr(module, attr) for attr in ("weight", "bias")}
            weights = [tuple(g.get(f"{name}.{attr}", own[attr]) for attr in ("weight", "bias")) for g in groups]
            saved[id(module)] = (module, module.__dict__.get("forward"))
            module.forward = functools.partial(_grouped_linear, weights=weights, sizes=sizes)  # shadows the class's forward
        yield
    finally:
        for module, previous in saved.values():
            if previous is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = previous


def grouped_predictions(
    unet: torch.nn.Module, groups: Sequence[tuple[Params, Sequence[Batch]]], differing: Sequence[str], alphas_cumprod: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[predictions_at(unet, params, batches) for params, batches in groups]``, where the groups'
    parameter dicts hold the same tensors except those named ``differing``. When every differing
    tensor belongs to an ``nn.Linear`` (the cross-attention projections of the K/V attacker and of
    its merge), the groups go through one UNet call on all their samples, each Linear layer
    applying each group's own weights to that group's samples: the same function as separate
    calls (every UNet layer is per-sample), with the per-call cost of the small batches paid once.
    Otherwise the calls are separate, in the groups' order."""
    layers = _linear_layers(unet, differing) if len(groups) > 1 else None
    if layers is None:
        return [predictions_at(unet, params, batches, alphas_cumprod) for params, batches in groups]
    first = groups[0][0]
    skip = set(differing)
    for params, _ in groups[1:]:
        if params.keys() != first.keys() or any(params[n] is not first[n] for n in first if n not in skip):
            raise ValueError("grouped_predictions: the groups' parameters differ outside the tensors named as differing")
    sizes = [sum(b.latents.shape[0] for b in batches) for _, batches in groups]
    with _per_group_layers(unet, layers, [params for params, _ in groups], sizes):
        pred, noise = predictions_at(unet, first, [b for _, batches in groups for b in batches], alphas_cumprod)
    return list(zip(pred.split(sizes), noise.split(sizes)))


def _per_batch_mse(a: torch.Tensor, b: torch.Tensor, batches: Sequence[Batch]) -> list[torch.Tensor]:
    per_sample = F.mse_loss(a, b, reduction="none").flatten(1).mean(1)
    return [part.mean() for part in per_sample.split([x.latents.shape[0] for x in batches])]


def diffusion_losses_at(unet: torch.nn.Module, params: Params, batches: Sequence[Batch], alphas_cumprod: torch.Tensor) -> list[torch.Tensor]:
    """``[L(theta; b) for b in batches]`` from one UNet call on the concatenated batches."""
    pred, noise = predictions_at(unet, params, batches, alphas_cumprod)
    return _per_batch_mse(pred, noise, batches)


def parameter_names(unet: torch.nn.Module, which: str) -> list[str]:
    """Names of a parameter set's UNet tensors: ``kv`` (cross-attention to_k/to_v), ``cross_attn``
    (every cross-attention projection), ``unet`` (every parameter) or ``lora`` (every attention
    projection's weight, which the LoRA attacker adapts); ``<set>+token`` names the set's (the
    word embeddings it adds are not UNet tensors), ``token`` none."""
    if which == "token":
        return []
    which = which.removesuffix("+token")
    names = [n for n, _ in unet.named_parameters()]
    if which == "lora":
        return [n for n in names if ".attn" in n and any(n.endswith(f".{t}.weight") for t in LORA_TARGETS)]
    if which == "unet":
        return names
    if which == "kv":
        return [n for n in names if is_kv(n)]
    if which == "cross_attn":
        return [n for n in names if ".attn2." in n and any(k in n for k in ("to_q.", "to_k.", "to_v.", "to_out."))]
    raise ValueError(f"unknown parameter set {which!r}; use kv, cross_attn, unet or lora (each optionally +token), or token")


def _update(g: torch.Tensor, rule: str) -> torch.Tensor:
    """The simulated attacker's update direction for one tensor."""
    if rule == "sgd":
        return g
    if rule == "sign":
        return torch.sign(g)
    if rule == "adam":  # Adam's first step from zero moments: m / (sqrt(v) + eps) = g / (|g| + eps)
        return g / (g.abs() + 1e-8)
    raise ValueError(f"unknown inner update {rule!r}")


def _attacker_start(params: Params, inner_names: Sequence[str], cfg: ImmunizeConfig, batch: Batch) -> Params:
    """The attacker's starting tensors: inner tensors outside the immunized set (frozen, detached)
    still need a gradient; the LoRA attacker starts its factors instead (:func:`_lora_start`;
    with ``inner_lora_start: per_step`` seeded by ``batch``, the concept's first inner batch)."""
    if learns_lora(cfg.inner_params):
        seed = _batch_seed(batch) if cfg.inner_lora_start == "per_step" else 0
        return _lora_start(params, inner_names, cfg.inner_lora_rank, seed)
    return {n: params[n] if params[n].requires_grad else params[n].detach().requires_grad_(True) for n in inner_names}


def _attacker_step(phi: Params, inner_names: Sequence[str], grads: Sequence[torch.Tensor | None], cfg: ImmunizeConfig, create_graph: bool) -> Params:
    """One attacker update ``phi - inner_lr * update(g)``; a tensor without a gradient stays; the
    gradient is a constant unless ``create_graph``."""
    new = {}
    for n, g in zip(inner_names, grads):
        if g is None:
            new[n] = phi[n]
            continue
        new[n] = phi[n] - cfg.inner_lr * _update(g if create_graph else g.detach(), cfg.inner_update)
    return new


def _differentiated(step: int, cfg: ImmunizeConfig, create_graph: bool) -> bool:
    """Whether attacker step ``step`` keeps its graph: every step under ``create_graph``, or only
    the last ``cfg.second_order_steps`` of them when that is set (truncated unrolling)."""
    return create_graph and (cfg.second_order_steps == 0 or step >= cfg.inner_steps - cfg.second_order_steps)


def simulate_attacker(
    unet: torch.nn.Module,
    params: Params,
    inner_names: Sequence[str],
    batches: Sequence[tuple[Batch, Batch]],
    alphas_cumprod: torch.Tensor,
    cfg: ImmunizeConfig,
    create_graph: bool,
) -> Params:
    """``cfg.inner_steps`` attacker steps on ``inner_names`` from ``params`` (never mutated):
    ``phi <- phi - inner_lr * update(grad [L(phi; D) + prior_weight L(phi; P)])``, one (D, P)
    batch pair per step. When ``cfg.inner_params`` learns word embeddings (``+token``), phi also
    holds the concept words' input embeddings (keyed ``token:<id>``), and D's conditioning is
    re-encoded with them at every step (P's captions, other concepts', keep theirs). Returns the
    adapted tensors by name (the LoRA attacker's as the weights ``W + B A`` its factors give).
    With ``create_graph`` the result is differentiable through the gradient (second order;
    through the last ``cfg.second_order_steps`` steps' gradients only when that is set);
    otherwise the gradient is a constant."""
    phi = _attacker_start(params, inner_names, cfg, batches[0][0])
    if learns_token(cfg.inner_params):
        phi.update(_token_start(batches))
    names = list(phi)
    for step in range(cfg.inner_steps):
        graph = _differentiated(step, cfg, create_graph)
        concept_batch, prior_batch = batches[step % len(batches)]
        own, vectors = _split_tokens(phi, params)
        concept_batch = with_tokens(concept_batch, vectors)
        current = {**params, **own}
        if cfg.prior_weight:
            concept_loss, prior_loss = diffusion_losses_at(unet, current, [concept_batch, prior_batch], alphas_cumprod)
            loss = concept_loss + cfg.prior_weight * prior_loss
        else:
            loss = diffusion_loss_at(unet, current, concept_batch, alphas_cumprod)
        grads = torch.autograd.grad(loss, [phi[n] for n in names], create_graph=graph, allow_unused=True)
        phi = _attacker_step(phi, names, grads, cfg, graph)
    own, vectors = _split_tokens(phi, params)
    return {**own, **vectors}


def _token_start(batches: Sequence[tuple[Batch, Batch]]) -> Params:
    """The word-embedding attacker's start, from the token inputs of a concept's batches."""
    tokens = batches[0][0].tokens
    if tokens is None:
        raise ValueError("immunize.inner_params learns word embeddings (+token), but this concept's data has no token ids; build it with concept_data")
    return tokens.start()


def simulate_attackers(
    unet: torch.nn.Module,
    params: Params,
    inner_names: Sequence[str],
    batches: Sequence[Sequence[tuple[Batch, Batch]]],
    alphas_cumprod: torch.Tensor,
    cfg: ImmunizeConfig,
    create_graph: bool,
) -> list[Params]:
    """:func:`simulate_attacker` for each concept ``n`` on its ``batches[n]``, all from ``params``.
    When the attacker trains Linear layers only (the K/V attacker), every inner step of all the
    concepts is one UNet call (:func:`grouped_predictions`) and one backward: each concept works
    on its own alias of the starting tensors, so the gradient of the summed losses with respect to
    concept n's alias is concept n's own gradient. Otherwise the concepts run one after another."""
    if len(batches) <= 1 or _linear_layers(unet, inner_names) is None:
        return [simulate_attacker(unet, params, inner_names, b, alphas_cumprod, cfg, create_graph) for b in batches]
    token = learns_token(cfg.inner_params)
    # each concept's own start (its own LoRA A under per_step), aliased so that shared starting
    # tensors still give each concept its own gradient
    starts = [{n: v.view_as(v) for n, v in _attacker_start(params, inner_names, cfg, b[0][0]).items()} for b in batches]
    phis = [{**s, **(_token_start(b) if token else {})} for s, b in zip(starts, batches)]
    for step in range(cfg.inner_steps):
        graph = _differentiated(step, cfg, create_graph)
        groups = []
        for phi, pairs in zip(phis, batches):
            concept_batch, prior_batch = pairs[step % len(pairs)]
            own, vectors = _split_tokens(phi, params)
            concept_batch = with_tokens(concept_batch, vectors)
            groups.append(({**params, **own}, [concept_batch, prior_batch] if cfg.prior_weight else [concept_batch]))
        loss = 0.0
        for (pred, noise), (_, parts) in zip(grouped_predictions(unet, groups, inner_names, alphas_cumprod), groups):
            losses = _per_batch_mse(pred, noise, parts)
            loss = loss + (losses[0] + cfg.prior_weight * losses[1] if cfg.prior_weight else losses[0])
        # each concept's tensors in its own order (their word embeddings differ per concept)
        names = [list(phi) for phi in phis]
        grads = torch.autograd.grad(loss, [phi[n] for phi, ns in zip(phis, names) for n in ns], create_graph=graph, allow_unused=True)
        ends = np.cumsum([0] + [len(ns) for ns in names])
        phis = [_attacker_step(phi, ns, grads[ends[k] : ends[k + 1]], cfg, graph) for k, (phi, ns) in enumerate(zip(phis, names))]
    return [{**own, **vectors} for own, vectors in (_split_tokens(phi, params) for phi in phis)]


@dataclass
class MergeContext:
    """What the merging layer needs, computed once per run: the factor of M = K^T K + delta I and
    each concept's target rows."""

    factor: MergeFactor
    targets: list[torch.Tensor]
    kind: str = "hard"
    lam: float = 100.0

    def __post_init__(self):
        # everything that depends on the fixed targets alone, once per run, in float64
        self.factor64 = self.factor.to(torch.float64)
        self.targets64 = [t.double() for t in self.targets]
        self.plan = HardMergePlan.build(self.targets64, self.factor64) if self.kind == "hard" else None

    def merge_tensor(self, W: torch.Tensor, adapted: Sequence[torch.Tensor]) -> torch.Tensor:
        """Merge in float64 (the solves are ill-conditioned in float32), differentiably cast back."""
        W64, A64 = W.double(), [a.double() for a in adapted]
        if self.kind == "hard":
            merged = hard_merge(W64, A64, self.targets64, self.factor64, plan=self.plan)
        else:
            merged = soft_merge(W64, A64, self.targets64, self.factor64, self.lam)
        return merged.to(W.dtype)


def merge_adapted(params: Params, adapted: Sequence[Params], ctx: MergeContext | None) -> tuple[Params, float]:
    """The merged attacker: the closed-form merge on every cross-attention K/V tensor, the mean on
    every other adapted tensor. With one concept and no context, the adapted tensors themselves.
    Returns the merged tensors and the mean relative merge residual on K/V."""
    if len(adapted) == 1 and ctx is None:
        return dict(adapted[0]), 0.0
    merged, residuals = {}, []
    for name in adapted[0]:
        tensors = [a[name] for a in adapted]
        if is_kv(name) and ctx is not None:
            merged[name] = ctx.merge_tensor(params[name], tensors)
            residuals.append(merge_residual(merged[name].double(), [t.double() for t in tensors], ctx.targets64))
        else:
            merged[name] = torch.stack(tensors).mean(0)
    return merged, float(np.mean(residuals)) if residuals else 0.0


@dataclass
class StepBatches:
    """Fixed batches of one outer step: per concept, the inner (D, P) pairs and the outer (D, P)."""

    inner: list[list[tuple[Batch, Batch]]]
    outer: list[tuple[Batch, Batch]]


class ConceptShards:
    """Concept parallelism (DESIGN section 8): process ``rank`` of ``world`` runs the simulated
    attackers of the concepts ``n`` with ``n % world == rank`` and the outer loss terms of those
    concepts. Every process receives every adapted tensor (broadcast from its owner), computes
    the same merge and its share of the outer loss; :meth:`backward` then sends each process's
    gradient with respect to the adapted tensors it does not own back to their owner, which
    carries it through its own attackers, and sums the outer gradients across processes. Every
    collective runs outside autograd, in the same order on every process. Built from an
    ``accelerate.Accelerator``."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world
        self._pending: tuple | None = None

    @classmethod
    def from_accelerator(cls, accelerator) -> "ConceptShards | None":
        return cls(accelerator.process_index, accelerator.num_processes) if accelerator is not None and accelerator.num_processes > 1 else None

    def owns(self, n: int) -> bool:
        return n % self.world == self.rank

    def exchange(self, own: dict[int, Params], n_concepts: int, like: Params) -> list[Params]:
        """Every concept's adapted tensors: this process's own (with their graph) and the others'
        as leaves that collect the gradient to send back."""
        names = list(next(iter(own.values()))) if own else list(like)
        adapted = []
        for n in range(n_concepts):
            # one flat broadcast per concept: a collective per tensor costs more than the step's compute
            if n in own:
                flat = torch.cat([own[n][k].detach().reshape(-1) for k in names])
            else:
                flat = torch.empty(sum(like[k].numel() for k in names), dtype=like[names[0]].dtype, device=like[names[0]].device)
            torch.distributed.broadcast(flat, src=n % self.world)
            parts = flat.split([like[k].numel() for k in names])
            adapted.append({k: own[n][k] if n in own else part.view_as(like[k]).clone().requires_grad_(True) for k, part in zip(names, parts)})
        self._pending = (own, adapted)
        return adapted

    def backward(self, loss: torch.Tensor, theta: Params) -> None:
        """Backward of this process's loss share, the adapted tensors' gradients returned to their
        owners and through the owners' attackers, then the sum of theta's gradients."""
        own, adapted = self._pending
        self._pending = None
        loss.backward(retain_graph=True)
        # the gradients with respect to every adapted tensor, summed in one flat all-reduce: an
        # owner's own entries are zero here, so it receives what the other processes computed
        keys = [(n, k) for n, tensors in enumerate(adapted) for k in tensors]
        values = [adapted[n][k] for n, k in keys]
        sent = [None if n in own else value.grad for (n, _), value in zip(keys, values)]
        received = _sum_across(sent, values)
        outputs, grads = [], []
        for (n, _), value, buf in zip(keys, values, received):
            if n in own and value.requires_grad:
                outputs.append(value)
                grads.append(torch.zeros_like(value) if buf is None else buf)
        if outputs:
            torch.autograd.backward(outputs, grads)
        names = list(theta)
        for n, g in zip(names, _sum_across([theta[n].grad for n in names], [theta[n] for n in names])):
            theta[n].grad = torch.zeros_like(theta[n]) if g is None else g

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place sum across processes (no graph), for the logged values."""
        torch.distributed.all_reduce(tensor)
        return tensor


def _sum_across(tensors: Sequence[torch.Tensor | None], like: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
    """Sum ``tensors`` over the processes in one flat all-reduce, outside autograd. ``None`` counts
    as zeros shaped like the matching ``like`` tensor; a slot that is ``None`` on every process
    stays ``None`` (an optimizer then skips it, as it would in one process)."""
    ref = like[0]
    flags = torch.tensor([0.0 if t is None else 1.0 for t in tensors], dtype=ref.dtype, device=ref.device)
    flat = torch.cat([(torch.zeros_like(w) if t is None else t.detach()).reshape(-1) for t, w in zip(tensors, like)] + [flags])
    torch.distributed.all_reduce(flat)
    out, offset = [], 0
    for w, got in zip(like, flat[flat.numel() - len(like):].tolist()):
        out.append(flat[offset : offset + w.numel()].view_as(w).clone() if got > 0 else None)
        offset += w.numel()
    return out


class BatchShards:
    """Data parallelism for the one-concept methods (``imma``, ``imma_joint``, ``imma_sequential``):
    every process draws the same batches (same generator, so the same rows, noise and
    timesteps as one process) and evaluates its contiguous share of each batch's rows, its loss
    scaled by share / batch size so that the sum over processes is the one-process batch mean.
    The simulated attacker's gradient is summed across processes at every inner step; the
    backward runs step by step in reverse, summing the vector-Jacobian products of every
    process's share, and the outer gradient is summed at the end. Every collective runs outside
    autograd, in the same order on every process. Built from an ``accelerate.Accelerator``."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world
        self._pending: tuple | None = None

    @classmethod
    def from_accelerator(cls, accelerator) -> "BatchShards | None":
        return cls(accelerator.process_index, accelerator.num_processes) if accelerator is not None and accelerator.num_processes > 1 else None

    def part(self, batch: Batch) -> tuple[Batch, float]:
        """This process's rows of ``batch`` and their share of it."""
        n = batch.latents.shape[0]
        lo, hi = self.rank * n // self.world, (self.rank + 1) * n // self.world
        return Batch(batch.latents[lo:hi], batch.text[lo:hi], batch.noise[lo:hi], batch.t[lo:hi]), (hi - lo) / n

    def sum(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The sum over processes of same-shaped tensors (zeros stand in for missing ones)."""
        flat = torch.cat([t.detach().reshape(-1) for t in tensors])
        torch.distributed.all_reduce(flat)
        return [part.view_as(t).clone() for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]

    def _losses(self, unet, params: Params, batches: Sequence[Batch], alphas_cumprod) -> list[torch.Tensor]:
        parts = [self.part(b) for b in batches]
        losses = diffusion_losses_at(unet, params, [b for b, _ in parts], alphas_cumprod)
        return [loss * share for loss, (_, share) in zip(losses, parts)]

    def objective(self, unet, theta: Params, frozen: Params, inner_names: Sequence[str], batches: StepBatches, alphas_cumprod,
                  cfg: ImmunizeConfig, create_graph: bool, teacher: Params | None = None) -> tuple[torch.Tensor, dict]:
        """IMMA's outer loss (:func:`outer_objective` with one concept and no merge), this process's
        share of it kept for :meth:`backward`; returns the total loss (no graph) and its parts."""
        if len(batches.inner) != 1:
            raise ValueError("data-parallel immunization runs one concept (imma, imma_joint, imma_sequential)")
        params = {**frozen, **theta}
        # 1. the simulated attacker, its gradient summed across processes at every step
        steps = []
        phi = {n: params[n].detach() for n in inner_names}
        for k in range(cfg.inner_steps):
            graph = _differentiated(k, cfg, create_graph)
            concept_batch, prior_batch = batches.inner[0][k % len(batches.inner[0])]
            x = {n: v.detach().requires_grad_(True) for n, v in phi.items()}
            current = {**params, **x}
            if cfg.prior_weight:
                concept_loss, prior_loss = self._losses(unet, current, [concept_batch, prior_batch], alphas_cumprod)
                loss = concept_loss + cfg.prior_weight * prior_loss
            else:
                loss = self._losses(unet, current, [concept_batch], alphas_cumprod)[0]
            local = torch.autograd.grad(loss, [x[n] for n in inner_names], create_graph=graph, allow_unused=True)
            total = _sum_across(local, [x[n] for n in inner_names])
            out = {}
            for n, g, G in zip(inner_names, local, total):
                if G is None:  # no gradient on any process: no update, as in one process
                    continue
                # the value is the summed gradient exactly; the graph reaches this process's share
                g_total = G + (g - g.detach()) if graph and g is not None else G
                out[n] = -cfg.inner_lr * _update(g_total, cfg.inner_update)
            steps.append((x, out))
            phi = {n: (x[n] + out[n]).detach() if n in out else x[n].detach() for n in inner_names}
        # 2. the outer loss at the adapted weights (a leaf: its gradient is summed before the attacker's backward)
        y = {n: v.detach().requires_grad_(True) for n, v in phi.items()}
        concept_batch, prior_batch = batches.outer[0]
        concept = self._losses(unet, {**params, **y}, [concept_batch], alphas_cumprod)[0]
        at_theta = [prior_batch] + ([concept_batch] if cfg.objective in ("gap", "ratio") else [])
        mine = [self.part(b) for b in at_theta]
        pred, noise = predictions_at(unet, params, [b for b, _ in mine], alphas_cumprod)
        per_batch = [loss * share for loss, (_, share) in zip(_per_batch_mse(pred, noise, [b for b, _ in mine]), mine)]
        utility = per_batch[0]
        weight = cfg.prior_weight if cfg.utility_weight is None else cfg.utility_weight
        if cfg.utility == "distill" and teacher is not None:
            with torch.no_grad():
                target, _ = predictions_at(unet, {**params, **teacher}, [mine[0][0]], alphas_cumprod)
            keep = weight * _per_batch_mse(pred[: target.shape[0]], target, [mine[0][0]])[0] * mine[0][1]
        else:
            keep = weight * utility
        at_theta_concept = per_batch[1] if cfg.objective in ("gap", "ratio") else torch.zeros((), dtype=concept.dtype, device=concept.device)
        sums = self.sum([torch.stack([concept.detach(), utility.detach(), keep.detach(), at_theta_concept.detach()]).double()])[0]
        if cfg.objective == "cap":
            attack_term = concept if sums[0] <= cfg.objective_cap else concept * 0.0  # clamp's gradient on the whole batch's loss
            attack_total = torch.clamp(sums[0], max=cfg.objective_cap)
        elif cfg.objective == "gap":
            attack_term, attack_total = concept - per_batch[1], sums[0] - sums[3]
        elif cfg.objective == "ratio":
            # A / B of the summed losses; its gradient dA / B - A dB / B^2 is linear in this
            # process's shares of A and B, so the processes' terms sum to the whole gradient
            a, b = sums[0].to(concept.dtype), sums[3].to(concept.dtype)
            attack_term, attack_total = concept / b - a * per_batch[1] / b**2, sums[0] / sums[3]
        else:
            attack_term, attack_total = concept, sums[0]
        self._pending = (-attack_term + keep, y, steps, inner_names, create_graph)
        total = (-attack_total + sums[2]).to(concept.dtype)
        return total, {"concept_loss": sums[0].item(), "utility_loss": sums[1].item(), "merge_residual": 0.0}

    def backward(self, theta: Params) -> None:
        """The summed outer gradient in ``theta``'s ``.grad``, the same on every process."""
        loss, y, steps, inner_names, create_graph = self._pending
        self._pending = None
        loss.backward()
        v = dict(zip(inner_names, self.sum([y[n].grad if y[n].grad is not None else torch.zeros_like(y[n]) for n in inner_names])))
        if create_graph:  # second order: back through the attacker's steps, last first
            for x, out in reversed(steps):
                names = [n for n in out if out[n].requires_grad]
                if names:  # this process's share of v^T d(step)/d(input) ...
                    torch.autograd.backward([out[n] for n in names], [v[n] for n in names])
                # ... summed, plus the identity part of phi_k = phi_{k-1} + step (the same everywhere, once)
                back = self.sum([x[n].grad if x[n].grad is not None else torch.zeros_like(x[n]) for n in inner_names])
                v = {n: v[n] + b for n, b in zip(inner_names, back)}
        # the attacker starts from theta: the identity path, counted once (on the first process)
        if self.rank == 0:
            for n in inner_names:
                if n in theta:
                    theta[n].grad = v[n].clone() if theta[n].grad is None else theta[n].grad + v[n]
        names = list(theta)
        summed = _sum_across([theta[n].grad for n in names], [theta[n] for n in names])
        for n, g in zip(names, summed):
            theta[n].grad = g


def outer_objective(
    unet: torch.nn.Module,
    theta: Params,
    frozen: Params,
    inner_names: Sequence[str],
    batches: StepBatches,
    alphas_cumprod: torch.Tensor,
    cfg: ImmunizeConfig,
    ctx: MergeContext | None,
    create_graph: bool,
    teacher: Params | None = None,
    shards: ConceptShards | None = None,
) -> tuple[torch.Tensor, dict]:
    """MIMA's outer loss ``-sum_n A_n + w * sum_n U_n(theta)`` and its parts, with
    ``w = cfg.utility_weight`` (``cfg.prior_weight`` when unset, as in DESIGN section 6).

    ``A_n`` is the concept term: ``L(theta_m; D_n)`` at the merged attacker (``cfg.objective ==
    "neg"``, DESIGN section 6), that loss capped at ``cfg.objective_cap`` (``cap``: once the
    attacker's loss is high enough the step spends itself on utility), or the gap
    ``L(theta_m; D_n) - L(theta; D_n)`` (``gap``: the attacker's own step must make the concept
    worse, not only start it from a bad point), or the ratio ``L(theta_m; D_n) / L(theta; D_n)``
    (``ratio``: scale-free, so a concept that is already hard at theta counts no more than one that
    is easy; both losses carry gradient, as in ``gap``).

    With ``shards``, this process computes the attackers and loss terms of its own concepts only
    (see :class:`ConceptShards`); the returned loss is its share, the reported parts are totals.

    ``U_n`` is the denoising loss ``L(theta; P_n)`` (``cfg.utility == "denoise"``, DESIGN
    section 6) or, with ``cfg.utility == "distill"`` and the starting weights given as
    ``teacher``, the squared distance between the UNet's predictions on ``P_n`` at theta and at
    the starting weights (which keeps what the model does with retained prompts, not only how
    well it denoises). The reported ``utility_loss`` is always the denoising loss."""
    params = {**frozen, **theta}
    mine = [n for n in range(len(batches.inner)) if shards is None or shards.owns(n)]
    own = dict(zip(mine, simulate_attackers(unet, params, inner_names, [batches.inner[n] for n in mine], alphas_cumprod, cfg, create_graph)))
    if shards is None:
        adapted = [own[n] for n in mine]
    else:
        adapted = shards.exchange(own, len(batches.inner), {k: params[k] for k in inner_names})
    # learned word embeddings are each concept's own (its words): they re-encode its batch, unmerged.
    # The merge's target rows C_n stay the words' states as written (encoded once); Custom
    # Diffusion's merge takes the learned token's states instead (not built here)
    adapted, vectors = zip(*[_split_tokens(a) for a in adapted])
    merged, residual = merge_adapted(params, list(adapted), ctx)
    concept_batches = [with_tokens(batches.outer[n][0], vectors[n]) for n in mine]
    priors = [batches.outer[n][1] for n in mine]
    # the concept batches at the merged attacker; the utility batches and, for the gap and ratio
    # objectives, the concept batches at theta (one UNet call for both when the merge changes Linear layers only).
    # The clean loss at theta reads the captions as written: re-encoded with the attacker's
    # vectors, the token part of the attack would cancel out of the gap and the ratio
    at_theta = priors + ([batches.outer[n][0] for n in mine] if cfg.objective in ("gap", "ratio") else [])
    at_merged, (pred, noise) = grouped_predictions(unet, [({**params, **merged}, concept_batches), (params, at_theta)], list(merged), alphas_cumprod)
    concept_parts = _per_batch_mse(*at_merged, concept_batches)
    concept = sum(concept_parts)
    per_batch = _per_batch_mse(pred, noise, at_theta)
    utility = sum(per_batch[: len(priors)])
    weight = cfg.prior_weight if cfg.utility_weight is None else cfg.utility_weight
    if cfg.utility == "distill" and teacher is not None:
        with torch.no_grad():
            target, _ = predictions_at(unet, {**params, **teacher}, priors, alphas_cumprod)
        keep = weight * sum(_per_batch_mse(pred[: target.shape[0]], target, priors))
    else:
        keep = weight * utility
    if cfg.objective == "cap":
        attack_term = sum(torch.clamp(part, max=cfg.objective_cap) for part in concept_parts)
    elif cfg.objective == "gap":
        attack_term = concept - sum(per_batch[len(priors) :])
    elif cfg.objective == "ratio":
        attack_term = sum(at_m / at_t for at_m, at_t in zip(concept_parts, per_batch[len(priors) :]))
    else:
        attack_term = concept
    loss = -attack_term + keep
    n = len(batches.outer)
    parts = torch.stack([concept.detach(), utility.detach()]).double()
    if shards is not None:
        shards.sum(parts)
    return loss, {"concept_loss": parts[0].item() / n, "utility_loss": parts[1].item() / n, "merge_residual": residual}


@contextlib.contextmanager
def double_backward_attention():
    """The math SDPA backend: the fused CPU/GPU kernels have no second derivative."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


@dataclass
class ImmunizeResult:
    theta: Params  # the immunized tensors (outer parameter set), detached
    log: dict[str, list] = field(default_factory=dict)
    seconds: float = 0.0


def _sample_step_batches(concepts: Sequence[ConceptData], prior: ConceptData, cfg: ImmunizeConfig, T: int, gen: torch.Generator) -> StepBatches:
    inner = [
        [(make_batch(c.latents, c.text, cfg.batch_size, T, gen, c.tokens), make_batch(prior.latents, prior.text, cfg.batch_size, T, gen)) for _ in range(cfg.inner_steps)]
        for c in concepts
    ]
    outer = [(make_batch(c.latents, c.text, cfg.batch_size, T, gen, c.tokens), make_batch(prior.latents, prior.text, cfg.batch_size, T, gen)) for c in concepts]
    return StepBatches(inner, outer)


def evaluation_batches(concepts: Sequence[ConceptData], prior: ConceptData, cfg: ImmunizeConfig, T: int, seed: int) -> list[StepBatches]:
    """Fixed batches on which the concept loss at the merged attacker and the utility loss are
    measured before and after immunization (the same batches for both)."""
    gen = torch.Generator().manual_seed(seed + 10_007)
    return [_sample_step_batches(concepts, prior, cfg, T, gen) for _ in range(cfg.eval_batches)]


def evaluate_objective(unet, theta, frozen, inner_names, eval_batches, alphas_cumprod, cfg, ctx) -> dict:
    """Mean concept loss at the merged simulated attacker and mean utility loss on fixed batches."""
    parts = []
    for b in eval_batches:
        _, info = outer_objective(unet, theta, frozen, inner_names, b, alphas_cumprod, cfg, ctx, create_graph=False)
        parts.append(info)
    return {k: float(np.mean([p[k] for p in parts])) for k in parts[0]}


def _require_resolved(cfg, steps) -> None:
    """Refuse a config whose per-threat keys (``mci_lib.config.PER_THREAT``) are still mappings;
    ``steps`` is the run's own number (run_mima takes one apart from cfg's, for IMMA-sequential)."""
    unresolved = [k for k in PER_THREAT if isinstance(steps if k == "steps" else getattr(cfg, k), dict)]
    if unresolved:
        raise TypeError(f"immunize.{', immunize.'.join(unresolved)} differ per threat; resolve them first with mci_lib.config.for_threat(params, threat)")


def _outer_step_loss(
    unet: torch.nn.Module, theta: Params, frozen: Params, inner_names: Sequence[str], batches: StepBatches, alphas_cumprod: torch.Tensor,
    cfg: ImmunizeConfig, ctx: MergeContext | None, teacher: Params | None, shards: ConceptShards | None, rows: BatchShards | None,
) -> tuple[torch.Tensor, dict]:
    """Step 2 of :func:`run_mima`: the outer loss of one step and its logged parts. ``alternating``
    first writes the attacker's merged update into ``theta`` (no graph through the merge), then
    takes the reference code's plain loss at it (``-L(D) + prior_weight L(P)``, denoising; neither
    ``utility`` nor ``objective`` applies); the other modes build :func:`outer_objective` through
    the attacker and the merge (or ``rows``' data-parallel share of it)."""
    second = cfg.mode == "second_order"
    if cfg.mode == "alternating":
        # 2a. the attacker's merged update is written into theta, no graph through the merge
        current = {**frozen, **{n: v.detach() for n, v in theta.items()}}
        adapted = simulate_attackers(unet, current, inner_names, batches.inner, alphas_cumprod, cfg, False)
        with torch.no_grad():
            merged, residual = merge_adapted(current, [{n: v.detach() for n, v in a.items()} for a in adapted], ctx)
            for n, v in merged.items():
                if n in theta:
                    theta[n].copy_(v)
        # 2b. an ordinary outer step at the attacked point, on the next batch
        params = {**frozen, **theta}
        parts = diffusion_losses_at(unet, params, [b for pair in batches.outer for b in pair], alphas_cumprod)
        concept, utility = sum(parts[0::2]), sum(parts[1::2])
        loss = -concept + cfg.prior_weight * utility
        n = len(batches.outer)
        info = {"concept_loss": concept.item() / n, "utility_loss": utility.item() / n, "merge_residual": residual}
        return loss, info
    # 2. the outer objective through the attacker and the merge
    with double_backward_attention() if second else contextlib.nullcontext():
        if rows is None:
            loss, info = outer_objective(unet, theta, frozen, inner_names, batches, alphas_cumprod, cfg, ctx, create_graph=second, teacher=teacher, shards=shards)
        else:
            loss, info = rows.objective(unet, theta, frozen, inner_names, batches, alphas_cumprod, cfg, create_graph=second, teacher=teacher)
    return loss, info


def run_mima(
    unet: torch.nn.Module,
    concepts: Sequence[ConceptData],
    prior: ConceptData,
    alphas_cumprod: torch.Tensor,
    cfg: ImmunizeConfig,
    ctx: MergeContext | None,
    seed: int,
    steps: int | None = None,
    theta: Params | None = None,
    progress: bool = True,
    on_step: Callable[[int, dict], None] | None = None,
    checkpoint_dir: Path | None = None,
    accelerator=None,
    data_parallel: bool = False,
) -> ImmunizeResult:
    """Immunize ``unet``'s ``cfg.outer_params`` against ``concepts`` with MIMA (or, with one concept
    and ``ctx=None``, IMMA). The module's own parameters are not modified; the immunized tensors
    are returned (start from ``theta`` when given, to chain runs as ``imma_sequential`` does).

    With ``checkpoint_dir`` and ``cfg.checkpoint_every`` > 0 the run writes a resumable
    checkpoint (theta, AdamW state, the batch generator's and torch's RNG states, the log) every
    ``checkpoint_every`` steps and at the end; with ``cfg.resume`` it continues from the one it
    finds there, and ends with the same weights as an uninterrupted run.

    With an ``accelerate.Accelerator`` of several processes (``accelerate launch``), the concepts
    are split across the processes (:class:`ConceptShards`); every process ends with the same
    weights as a single-process run, up to floating-point summation order. With
    ``data_parallel`` (one concept and no merge: IMMA), each step's batches are split across the
    processes instead (:class:`BatchShards`), with the same guarantee."""
    rows = BatchShards.from_accelerator(accelerator) if data_parallel else None
    shards = None if data_parallel else ConceptShards.from_accelerator(accelerator)
    if (shards is not None or rows is not None) and cfg.mode == "alternating":
        raise ValueError("immunize.mode alternating runs in one process; launch it without accelerate's multi-process mode")
    if rows is not None and (len(concepts) != 1 or ctx is not None):
        raise ValueError(f"data-parallel immunization runs one concept with no merge (IMMA); got {len(concepts)} concepts")
    if learns_token(cfg.inner_params) and (cfg.mode == "alternating" or shards is not None or rows is not None):
        raise ValueError(f"immunize.inner_params {cfg.inner_params} (word embeddings) runs in one process in the second_order or first_order mode; set immunize.mode to second_order or first_order and launch without accelerate's multi-process mode")
    if learns_lora(cfg.inner_params) and (shards is not None or rows is not None):
        raise ValueError(f"immunize.inner_params {cfg.inner_params} (low-rank factors) runs in one process; launch it without accelerate's multi-process mode")
    if rows is not None and cfg.batch_size < rows.world:
        raise ValueError(f"immunize.batch_size {cfg.batch_size} is smaller than the {rows.world} processes; raise it or launch fewer processes")
    steps = cfg.steps if steps is None else steps
    _require_resolved(cfg, steps)
    gen = torch.Generator().manual_seed(seed)
    outer_names = parameter_names(unet, cfg.outer_params)
    inner_names = parameter_names(unet, cfg.inner_params)
    start = theta if theta is not None else {n: p for n, p in unet.named_parameters() if n in outer_names}
    theta = {n: start[n].detach().clone().requires_grad_(True) for n in outer_names}
    teacher = {n: v.detach().clone() for n, v in theta.items()} if cfg.utility == "distill" else None
    frozen = {n: p.detach() for n, p in unet.named_parameters() if n not in theta}
    frozen.update({n: b for n, b in unet.named_buffers()})
    opt = torch.optim.AdamW(list(theta.values()), lr=cfg.outer_lr, weight_decay=0.0)
    T = alphas_cumprod.shape[0]
    log: dict[str, list] = {k: [] for k in ("step", "loss", "concept_loss", "utility_loss", "grad_norm", "merge_residual", "seconds")}
    t0 = time.time()
    first = 0
    if checkpoint_dir is not None and cfg.resume and checkpoint_step(checkpoint_dir) is not None:
        first, extra = load_training_state(checkpoint_dir, theta, opt, {"batches": gen})
        log, t0 = extra["log"], t0 - extra["seconds"]
    second = cfg.mode == "second_order"
    rank = shards.rank if shards is not None else rows.rank if rows is not None else 0
    quiet = not progress or rank != 0
    device = next(iter(theta.values())).device.type
    if cfg.mixed_precision == "bf16" and device == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("immunize.mixed_precision: bf16, but this CUDA device has no bfloat16; set it to fp32")
    for step in tqdm(range(first, steps), desc=f"immunize ({cfg.mode})", disable=quiet, initial=first, total=steps):
        # 1. fixed batches for this step: per concept, the attacker's and the outer ones
        batches = _sample_step_batches(concepts, prior, cfg, T, gen)
        # the backward (step 3) runs outside autocast, on the graph it recorded
        with torch.autocast(device, dtype=torch.bfloat16) if cfg.mixed_precision == "bf16" else contextlib.nullcontext():
            loss, info = _outer_step_loss(unet, theta, frozen, inner_names, batches, alphas_cumprod, cfg, ctx, teacher, shards, rows)
        if not torch.isfinite(loss):
            where = f"; the last good checkpoint is in {checkpoint_dir}" if checkpoint_dir is not None and cfg.checkpoint_every > 0 else ""
            raise FloatingPointError(f"immunize: the outer loss is {loss.item()} at step {step}; stopped{where}. Lower immunize.outer_lr or immunize.inner_lr.")
        # 3. the outer optimizer step
        opt.zero_grad(set_to_none=True)
        with double_backward_attention() if second else contextlib.nullcontext():
            if rows is not None:
                rows.backward(theta)
            elif shards is None:
                loss.backward()
            else:
                shards.backward(loss, theta)
                loss = shards.sum(loss.detach().clone())
        grad_norm = torch.sqrt(sum((p.grad.detach() ** 2).sum() for p in theta.values() if p.grad is not None)).item()
        opt.step()
        row = {"step": step, "loss": loss.item(), "grad_norm": grad_norm, "seconds": time.time() - t0, **info}
        for k in log:
            log[k].append(row[k])
        if on_step is not None:
            on_step(step, row)
        due = checkpoint_dir is not None and cfg.checkpoint_every > 0 and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == steps)
        if due and rank == 0:  # every process holds the same weights: one writes
            save_training_state(checkpoint_dir, step + 1, theta, opt, {"batches": gen}, extra={"log": log, "seconds": time.time() - t0})
    return ImmunizeResult({n: v.detach().clone() for n, v in theta.items()}, log, time.time() - t0)


# ---------------------------------------------------------------------------------------------
# methods and their inputs


def concept_data(
    pipe, name: str, latents: torch.Tensor, captions: Sequence[str], target_prompts: Sequence[str], target_words: Sequence[str], merge_rows: str = "sequence"
) -> ConceptData:
    """A concept's defense data: latents with the text-encoder states of their captions, and the
    target rows of ``target_prompts`` for the merge: from the concept word to the end of the
    sequence (``merge_rows="sequence"``, padding included) or to the end-of-text token
    (``"prompt"``, as Custom Diffusion's merge; :func:`mci_lib.erase.token_rows`). Its token
    inputs name every token of ``target_words``: what a ``+token`` attacker learns."""
    text = encode_prompts(pipe, list(captions))
    rows = torch.cat(token_rows(pipe, target_prompts, target_words, merge_rows))
    words = [i for w in dict.fromkeys(target_words) for i in pipe.tokenizer(w, add_special_tokens=False).input_ids]
    return ConceptData(name, latents, text, rows, TokenInputs(prompt_ids(pipe, list(captions)), words, pipe.text_encoder))


def merge_context(pipe, concepts: Sequence[ConceptData], reg_captions: Sequence[str], cfg: ImmunizeConfig) -> MergeContext:
    """The merge's fixed inputs, computed once per run: every token row of the regularization
    captions (K) factored as M = K^T K + delta I, and each concept's target rows."""
    K = encode_prompts(pipe, list(reg_captions)).reshape(-1, pipe.text_encoder.config.hidden_size).double()
    return MergeContext(MergeFactor.from_embeddings(K, cfg.merge_delta), [c.target_rows.double() for c in concepts], cfg.merge, cfg.merge_lam)


def _union(concepts: Sequence[ConceptData]) -> ConceptData:
    return ConceptData(
        "+".join(c.name for c in concepts),
        torch.cat([c.latents for c in concepts]),
        torch.cat([c.text for c in concepts]),
        torch.cat([c.target_rows for c in concepts]),
        functools.reduce(TokenInputs.union, [c.tokens for c in concepts]) if all(c.tokens is not None for c in concepts) else None,
    )


def immunize(
    method: str,
    unet: torch.nn.Module,
    concepts: Sequence[ConceptData],
    prior: ConceptData,
    alphas_cumprod: torch.Tensor,
    cfg: ImmunizeConfig,
    ctx: MergeContext,
    seed: int,
    progress: bool = True,
    checkpoint_dir: Path | None = None,
    accelerator=None,
) -> ImmunizeResult:
    """One entry point for every method: ``mima`` (merge of N simulated attackers), ``imma`` (one
    concept), ``imma_joint`` (IMMA on the union of all concepts' data) and ``imma_sequential``
    (IMMA on one concept after another, ``cfg.steps`` in total). ``checkpoint_dir``: where the
    resumable checkpoints go; ``accelerator``: concept-parallel ``mima`` across its processes,
    data-parallel single-concept methods (each step's batch split across the processes); see
    :func:`run_mima`."""
    if not concepts:
        raise ValueError("immunize: no concepts given; set the threat's targets in params.yaml")
    _require_resolved(cfg, cfg.steps)
    if method == "mima":
        return run_mima(unet, concepts, prior, alphas_cumprod, cfg, ctx, seed, progress=progress, checkpoint_dir=checkpoint_dir, accelerator=accelerator)
    if method == "imma":
        if len(concepts) != 1:
            raise ValueError(f"imma immunizes one concept; got {len(concepts)} (use mima, imma_joint or imma_sequential)")
        return run_mima(unet, concepts, prior, alphas_cumprod, cfg, None, seed, progress=progress, checkpoint_dir=checkpoint_dir,
                        accelerator=accelerator, data_parallel=True)
    if method == "imma_joint":
        return run_mima(unet, [_union(concepts)], prior, alphas_cumprod, cfg, None, seed, progress=progress, checkpoint_dir=checkpoint_dir,
                        accelerator=accelerator, data_parallel=True)
    if method == "imma_sequential":
        theta, logs, seconds = None, [], 0.0
        share = [cfg.steps // len(concepts) + (1 if k < cfg.steps % len(concepts) else 0) for k in range(len(concepts))]
        for k, (concept, steps) in enumerate(zip(concepts, share)):
            part = None if checkpoint_dir is None else Path(checkpoint_dir) / f"part{k}"
            result = run_mima(unet, [concept], prior, alphas_cumprod, cfg, None, seed + k, steps=steps, theta=theta, progress=progress, checkpoint_dir=part,
                              accelerator=accelerator, data_parallel=True)
            theta, seconds = result.theta, seconds + result.seconds
            logs.append(result.log)
        log = {key: [v for part in logs for v in part[key]] for key in logs[0]}
        log["step"] = list(range(len(log["step"])))
        return ImmunizeResult(theta, log, seconds)
    raise ValueError(f"unknown immunization method {method!r}; use mima, imma, imma_joint or imma_sequential")


def changed_tensors(unet: torch.nn.Module, theta: Params) -> Params:
    """Exactly the tensors that immunization changed (for the safetensors delta)."""
    current = dict(unet.named_parameters())
    return {n: v.detach().clone() for n, v in theta.items() if not torch.equal(v, current[n].detach())}


@torch.no_grad()
def apply_delta(unet: torch.nn.Module, delta: Params) -> None:
    """Write a delta into ``unet``; a tensor it does not have, or of another shape, is an error."""
    current = dict(unet.named_parameters())
    for n, v in delta.items():
        if n not in current:
            raise ValueError(f"delta tensor {n!r} is not a parameter of this UNet (a delta for another architecture?)")
        if current[n].shape != v.shape:
            raise ValueError(f"delta tensor {n!r} has shape {tuple(v.shape)}, the UNet's is {tuple(current[n].shape)}")
        current[n].copy_(v)


def toy_threat_concepts(
    pipe, data_dir, records, world, targets: Sequence[str], vae_latents, prior_size: int, seed: int, utility_uncond: float = 0.0, merge_rows: str = "sequence"
) -> tuple[list[ConceptData], ConceptData]:
    """The toy world's inputs for one threat: each target's ``defense`` split (shapes captioned
    "a photo of a <color> <shape>", personal subjects "a photo of a <class word>", real concepts
    with their metadata prompts, whose concept words give the merge's target rows) and, as the
    prior/utility data, ``prior_size`` ``pretrain`` images of the other shapes, a
    ``utility_uncond`` share of them with the empty caption (the unconditional prediction that
    guidance uses: without it an immunization may leave every conditional prediction in place and
    still break sampling). ``merge_rows`` (``immunize.merge_rows``) picks which rows of the target
    prompts enter the merge (:func:`concept_data`)."""
    concepts = []
    for target in targets:
        recs = select(records, "defense", target)
        if not recs:
            raise ValueError(f"threat target {target!r} has no defense images in {data_dir}; known subjects: {sorted({r.subject for r in records})}")
        latents = vae_latents(load_images(data_dir, recs))
        if target in PERSONAL_SUBJECTS:
            word = PERSONAL_SUBJECTS[target]["class_word"]
            captions = [f"a photo of a {word}"] * len(recs)
            prompts, words = [f"a photo of a {word}"], [word]
        elif target in world.real:
            captions = [r.caption for r in recs]
            prompts = real_prompts(records, target)
            words = [concept_word(target)] * len(prompts)
        else:
            captions = [f"a photo of a {r.color} {target}" for r in recs]
            prompts, words = [f"a photo of a {c} {target}" for c in world.colors], [target] * len(world.colors)
        concepts.append(concept_data(pipe, target, latents, captions, prompts, words, merge_rows))
    rng = np.random.default_rng(seed)
    others = [r for r in select(records, "pretrain") if r.subject not in targets]
    chosen = [others[i] for i in sorted(rng.choice(len(others), size=min(prior_size, len(others)), replace=False))]
    prior_caps = [fresh_caption(rng, r) for r in chosen]
    if utility_uncond > 0:  # drawn after the captions: a zero share keeps the earlier prior exactly
        for i in rng.choice(len(chosen), size=round(utility_uncond * len(chosen)), replace=False):
            prior_caps[i] = ""
    prior = ConceptData("prior", vae_latents(load_images(data_dir, chosen)), encode_prompts(pipe, prior_caps), torch.zeros(0, pipe.text_encoder.config.hidden_size))
    return concepts, prior
