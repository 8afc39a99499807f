import pytest
import torch

from mci_lib import erase


def test_uce_edit_solves_its_least_squares_problem():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(5, 6, generator=g, dtype=torch.float64)
    c = torch.randn(3, 6, generator=g, dtype=torch.float64)
    cg = torch.randn(3, 6, generator=g, dtype=torch.float64)
    r = torch.randn(4, 6, generator=g, dtype=torch.float64)
    lam, s_p = 0.1, 0.5
    new = erase.uce_edit(W, c, cg, r, lam, s_p)
    # independent: stack the weighted least-squares rows X W'^T ~= Y and solve with lstsq
    X = torch.cat([lam**0.5 * torch.eye(6, dtype=torch.float64), c, s_p**0.5 * r])
    Y = torch.cat([lam**0.5 * W.T, (W @ cg.T).T, s_p**0.5 * (W @ r.T).T])
    expected = torch.linalg.lstsq(X, Y).solution.T
    assert torch.allclose(new, expected, atol=1e-10)


def test_uce_edit_maps_concept_to_guide_and_keeps_preserved():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(5, 8, generator=g, dtype=torch.float64)
    c, cg, r = (torch.randn(2, 8, generator=g, dtype=torch.float64) for _ in range(3))
    new = erase.uce_edit(W, c, cg, r, lam=1e-6, s_p=1.0)
    assert torch.allclose(new @ c.T, W @ cg.T, atol=1e-4)
    assert torch.allclose(new @ r.T, W @ r.T, atol=1e-4)


def test_uce_erase_edits_only_cross_attention_kv(micro_pipe, micro_params):
    before = {n: p.detach().clone() for n, p in micro_pipe.unet.named_parameters()}
    prompts = erase.shape_erase_prompts(["star"], ["circle", "square"], micro_params.world.colors[:2])
    edited = erase.uce_erase(micro_pipe, prompts, lam=0.1, s_p=0.1)
    assert edited and all(".attn2." in n and (n.endswith("to_k.weight") or n.endswith("to_v.weight")) for n in edited)
    for n, p in micro_pipe.unet.named_parameters():
        assert torch.equal(p, before[n]) != (n in edited), n


def test_concept_word_must_be_in_prompt(micro_pipe):
    with pytest.raises(ValueError, match="not a token run"):
        erase.concept_start(micro_pipe, "a photo of a circle", "star")
