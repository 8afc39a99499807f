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


def test_real_guide_erases_the_whole_prompt_towards_the_guide(micro_pipe):
    """With ``real_guide`` every position of a real concept's prompt, from its first word on, is
    paired with the same position of the guide prompt, so the edit also moves the words before
    the name ("An artwork by"), which an edit of the name's positions leaves where they were."""
    real = {"Flat_Painter": ["An artwork by Flat Painter."]}
    word_only = erase.shape_erase_prompts(["Flat_Painter"], ["circle"], ["red"], "circle", real)
    whole = erase.shape_erase_prompts(["Flat_Painter"], ["circle"], ["red"], "circle", real, real_guide="a photo of a red circle")
    assert word_only.guide == ("An artwork by circle.",) and word_only.erase_words == ("Flat Painter",)
    assert whole.guide == ("a photo of a red circle",) and whole.erase_words == ("An",)
    assert erase.concept_start(micro_pipe, whole.erase[0], "An") == 1  # right after the start token
    prompt_rows = erase.token_rows(micro_pipe, whole.erase, whole.erase_words)[0].double()
    guide_rows = erase.token_rows(micro_pipe, whole.guide, ["a"])[0].double()
    prefix = slice(0, erase.concept_start(micro_pipe, whole.erase[0], "Flat Painter") - 1)  # "An artwork by"
    name = next(n for n, _ in micro_pipe.unet.named_parameters() if n.endswith("attn2.to_k.weight"))
    W = dict(micro_pipe.unet.named_parameters())[name].detach().double().clone()

    def prefix_gap(prompts):
        with torch.no_grad():
            dict(micro_pipe.unet.named_parameters())[name].copy_(W.float())
        erase.uce_erase(micro_pipe, erase.ErasePrompts(prompts.erase, prompts.guide, (), prompts.erase_words, ()), lam=1e-4, s_p=0.0)
        W_new = dict(micro_pipe.unet.named_parameters())[name].detach().double()
        return (W_new @ prompt_rows[prefix].T - W @ guide_rows[prefix].T).norm().item()

    before = (W @ prompt_rows[prefix].T - W @ guide_rows[prefix].T).norm().item()
    g_whole, g_word = prefix_gap(whole), prefix_gap(word_only)
    assert g_whole < 0.5 * before
    assert g_word > 0.9 * before


def test_token_rows_through_the_prompt_stop_at_its_end_of_text_token(micro_pipe):
    """``through="prompt"`` keeps the concept word and the end-of-text token, no padding: the first
    rows of the ``"sequence"`` rows, as many as the prompt has tokens from the word on."""
    prompts, words = ["a photo of a badge", "a photo of a red star"], ["badge", "star"]
    whole = erase.token_rows(micro_pipe, prompts, words)
    short = erase.token_rows(micro_pipe, prompts, words, through="prompt")
    for p, w, s, q in zip(prompts, words, short, whole):
        n = len(micro_pipe.tokenizer(p).input_ids) - erase.concept_start(micro_pipe, p, w)
        assert s.shape[0] == n and n < q.shape[0] == micro_pipe.tokenizer.model_max_length - erase.concept_start(micro_pipe, p, w)
        assert torch.equal(s, q[:n])
    with pytest.raises(ValueError, match="expected one of sequence, prompt"):
        erase.token_rows(micro_pipe, prompts, words, through="padding")


def test_concept_data_takes_the_merge_rows_it_is_told(micro_pipe):
    """``immunize.merge_rows`` reaches the merge's target rows: ``concept_data`` with ``prompt``
    holds each target prompt's rows through its end-of-text token, with ``sequence`` through the
    padding."""
    from mci_lib import immunize

    prompts, words = ["a photo of a red star", "a photo of a blue star"], ["star", "star"]
    latents, captions = torch.zeros(2, 4, 4, 4), ["a photo of a red star", "a photo of a blue star"]
    for through in ("sequence", "prompt"):
        c = immunize.concept_data(micro_pipe, "star", latents, captions, prompts, words, merge_rows=through)
        expected = sum(r.shape[0] for r in erase.token_rows(micro_pipe, prompts, words, through))
        assert c.target_rows.shape[0] == expected
    short = immunize.concept_data(micro_pipe, "star", latents, captions, prompts, words, merge_rows="prompt").target_rows.shape[0]
    assert short == 2 * 2  # "star" and the end-of-text token, per prompt


def test_concept_data_holds_the_token_ids_a_token_attacker_reencodes(micro_pipe):
    """``concept_data``'s token inputs: the captions' ids and the concept word's, which re-encode
    to the captions' states at the word's own embedding and move them when the embedding moves;
    the joint (union) data learns both concepts' words."""
    from mci_lib import immunize

    latents = torch.zeros(2, 4, 4, 4)
    star = immunize.concept_data(micro_pipe, "star", latents, ["a photo of a red star", "a star, dotted style"], ["a photo of a red star"], ["star"])
    heart = immunize.concept_data(micro_pipe, "heart", latents, ["a photo of a red heart"] * 2, ["a photo of a red heart"], ["heart"])
    (word,) = star.tokens.words
    assert word == micro_pipe.tokenizer("star", add_special_tokens=False).input_ids[0] and bool((star.tokens.ids == word).any(1).all())
    table = micro_pipe.text_encoder.get_input_embeddings().weight.detach()
    with torch.no_grad():
        assert torch.allclose(star.tokens.states(star.tokens.ids, {f"token:{word}": table[word]}), star.text, atol=1e-6)
        # a random direction: a constant shift of every coordinate is invisible behind LayerNorm
        step = torch.randn(table.shape[1], generator=torch.Generator().manual_seed(0))
        moved = star.tokens.states(star.tokens.ids, {f"token:{word}": table[word] + step})
    assert not torch.allclose(moved, star.text, atol=1e-3)
    joint = immunize._union([star, heart])
    assert joint.tokens.words == tuple(sorted(star.tokens.words + heart.tokens.words)) and joint.tokens.ids.shape[0] == 4
