"""Concept erasure with UCE (DESIGN section 6, "UCE erasure"): a closed-form edit of every
cross-attention key and value projection, for many concepts at once.

For each projection ``W`` with erase-token embeddings ``c``, their guide embeddings ``c*`` and
preserved-token embeddings ``r``::

    W' = (lam W + sum (W c*) c^T + s_p sum (W r) r^T) (lam I + sum c c^T + s_p sum r r^T)^-1

so that ``W' c ~= W c*`` (the erased word now maps where its guide maps) while ``W' r ~= W r``.
Token vectors from the concept word to the end of the sequence (padding included) carry the
concept, so every such position of every erase prompt contributes a (c, c*) pair.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from diffusers import StableDiffusionPipeline

from .config import TOKEN_ROWS
from .data import concept_word
from .models import encode_prompts, is_cross_attention_kv


@dataclass(frozen=True)
class ErasePrompts:
    """Aligned erase / guide prompts (same token positions) and preserved prompts."""

    erase: tuple[str, ...]
    guide: tuple[str, ...]
    preserve: tuple[str, ...]
    erase_words: tuple[str, ...]  # the concept word of each erase prompt
    preserve_words: tuple[str, ...]


def concept_start(pipe: StableDiffusionPipeline, prompt: str, word: str) -> int:
    """Token position of the first token of ``word`` in ``prompt`` (after the start token)."""
    ids = pipe.tokenizer(prompt).input_ids
    wids = pipe.tokenizer(word, add_special_tokens=False).input_ids
    for i in range(len(ids) - len(wids) + 1):
        if ids[i : i + len(wids)] == wids:
            return i
    raise ValueError(f"concept word {word!r} is not a token run of prompt {prompt!r}")


def token_rows(pipe: StableDiffusionPipeline, prompts: Sequence[str], words: Sequence[str], through: str = "sequence") -> list[torch.Tensor]:
    """For each prompt, the text-encoder rows from its concept word to the end of the sequence
    (``through="sequence"``, padding included: what UCE edits) or to its end-of-text token
    (``"prompt"``: the unpadded tokens, as Custom Diffusion's and MIMA's merge take them)."""
    if through not in TOKEN_ROWS:
        raise ValueError(f"token rows through {through!r}: expected one of {', '.join(TOKEN_ROWS)}")
    hidden = encode_prompts(pipe, list(prompts))
    ends = [len(pipe.tokenizer(p).input_ids) if through == "prompt" else h.shape[0] for h, p in zip(hidden, prompts)]
    return [h[concept_start(pipe, p, w) : end] for h, p, w, end in zip(hidden, prompts, words, ends)]


def shape_erase_prompts(
    targets: Sequence[str], preserved: Sequence[str], colors: Sequence[str], guide_word: str = "shape", real_prompts: Mapping[str, Sequence[str]] | None = None,
    real_guide: str = "",
) -> ErasePrompts:
    """Toy-world prompts: "a photo of a <color> <target>" guided to "a photo of a <color> <guide_word>",
    and "a photo of a <color> <preserved>" kept, over every color. An empty ``guide_word`` guides
    to "a photo of a <color>": the concept's positions then map where the end-of-text and padding
    tokens map (UCE's empty-prompt guide). A target in ``real_prompts`` (a real concept) is erased
    in each of its own prompts, guided to the same prompt with its words replaced by ``guide_word``;
    with a ``real_guide`` prompt, the whole of each of its prompts (every position from the first
    word on) is guided to ``real_guide`` instead: where the words around the name ("An artwork
    by") belong to the erased concepts alone, they carry the concept too."""
    real_prompts = real_prompts or {}
    erase, guide, ewords, preserve, pwords = [], [], [], [], []
    for t in targets:
        if t in real_prompts:
            word = concept_word(t)
            for prompt in real_prompts[t]:
                erase.append(prompt)
                if real_guide:
                    guide.append(real_guide)
                    ewords.append(prompt.split()[0])
                else:
                    guide.append(" ".join(re.sub(re.escape(word), guide_word, prompt, flags=re.IGNORECASE).split()))
                    ewords.append(word)
            continue
        for c in colors:
            erase.append(f"a photo of a {c} {t}")
            guide.append(f"a photo of a {c} {guide_word}".rstrip())
            ewords.append(t)
    for s in preserved:
        for c in colors:
            preserve.append(f"a photo of a {c} {s}")
            pwords.append(s)
    return ErasePrompts(tuple(erase), tuple(guide), tuple(preserve), tuple(ewords), tuple(pwords))


def uce_edit(W: torch.Tensor, c: torch.Tensor, c_guide: torch.Tensor, r: torch.Tensor, lam: float, s_p: float) -> torch.Tensor:
    """One UCE edit of ``W`` (d_out x d) with erase rows ``c``, guide rows ``c_guide`` (same shape)
    and preserved rows ``r`` (all (n, d)). A linear solve, not an explicit inverse."""
    d = W.shape[1]
    eye = torch.eye(d, dtype=W.dtype, device=W.device)
    A = lam * eye + c.T @ c + s_p * r.T @ r  # symmetric positive definite
    B = lam * W + (W @ c_guide.T) @ c + s_p * (W @ r.T) @ r
    return torch.linalg.solve(A, B.T).T  # W' A = B, A symmetric


@torch.no_grad()
def uce_erase(pipe: StableDiffusionPipeline, prompts: ErasePrompts, lam: float, s_p: float) -> dict[str, torch.Tensor]:
    """Erase the concepts of ``prompts`` from ``pipe.unet`` in place: every cross-attention ``to_k``
    and ``to_v`` weight gets the UCE edit. Returns the edited tensors by parameter name."""
    if len(prompts.erase) != len(prompts.guide):
        raise ValueError("UCE: erase and guide prompts must be aligned one to one")
    c_rows = token_rows(pipe, prompts.erase, prompts.erase_words)
    # guide rows at the same positions as the erase rows: the guide word sits where the concept word sits
    g_hidden = encode_prompts(pipe, list(prompts.guide))
    g_rows = [g[-c.shape[0] :] for g, c in zip(g_hidden, c_rows)]
    c = torch.cat(c_rows).double()
    cg = torch.cat(g_rows).double()
    r = torch.cat(token_rows(pipe, prompts.preserve, prompts.preserve_words)).double() if prompts.preserve else c[:0]
    edited = {}
    for name, param in pipe.unet.named_parameters():
        if is_cross_attention_kv(name):
            new = uce_edit(param.double(), c, cg, r, lam, s_p).to(param.dtype)
            param.copy_(new)
            edited[name] = new
    if not edited:
        raise ValueError("UCE: the UNet has no cross-attention to_k/to_v weights")
    return edited
