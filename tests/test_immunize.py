"""Each immunization mode computes the gradient it claims (DESIGN section 6), on a micro UNet in float64."""

from dataclasses import replace

import pytest
import torch

from mci_lib import immunize as im
from mci_lib.config import ImmunizeConfig
from mci_lib.merge import MergeFactor
from resume_worker import micro_unet


@pytest.fixture(autouse=True)
def math_attention():
    """float64 attention on the CPU: the math backend (the fused kernel's float64 path is very slow)."""
    with im.double_backward_attention():
        yield


@pytest.fixture()
def setup():
    unet = micro_unet().double()
    g = torch.Generator().manual_seed(1)

    def concept(name, n=6):
        return im.ConceptData(name, torch.randn(n, 4, 4, 4, generator=g, dtype=torch.float64), torch.randn(n, 5, 6, generator=g, dtype=torch.float64), torch.randn(2, 6, generator=g, dtype=torch.float64))

    concepts = [concept("a"), concept("b")]
    prior = concept("prior")
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)
    K = torch.randn(30, 6, generator=g, dtype=torch.float64)
    ctx = im.MergeContext(MergeFactor.from_embeddings(K, 1e-3), [c.target_rows for c in concepts])
    cfg = ImmunizeConfig(inner_lr=0.5, outer_params="kv", inner_params="kv", batch_size=2, prior_weight=0.5)
    batches = im._sample_step_batches(concepts, prior, cfg, 1000, torch.Generator().manual_seed(2))
    return unet, concepts, prior, abar, ctx, cfg, batches


def _split(unet, cfg):
    names = im.parameter_names(unet, cfg.outer_params)
    theta = {n: p.detach().clone().requires_grad_(True) for n, p in unet.named_parameters() if n in names}
    frozen = {n: p.detach() for n, p in unet.named_parameters() if n not in theta}
    return theta, frozen, im.parameter_names(unet, cfg.inner_params)


def _flat_grad(theta, loss):
    grads = torch.autograd.grad(loss, list(theta.values()))
    return torch.cat([g.reshape(-1) for g in grads])


def test_second_order_matches_finite_differences(setup):
    unet, concepts, prior, abar, ctx, cfg, batches = setup
    theta, frozen, inner = _split(unet, cfg)
    with im.double_backward_attention():
        loss, _ = im.outer_objective(unet, theta, frozen, inner, batches, abar, cfg, ctx, create_graph=True)
        grad = _flat_grad(theta, loss)

    def objective_at(th):
        with torch.enable_grad():
            value, _ = im.outer_objective(unet, th, frozen, inner, batches, abar, cfg, ctx, create_graph=False)
        return value.item()

    assert _central_difference(objective_at, theta, grad, seed=3) == pytest.approx(float(grad @ _direction(grad, 3)), rel=1e-5, abs=1e-8)


def test_first_order_is_outer_gradient_with_inner_gradient_held_constant(setup):
    unet, concepts, prior, abar, ctx, cfg, batches = setup
    theta, frozen, inner = _split(unet, cfg)
    loss, _ = im.outer_objective(unet, theta, frozen, inner, batches, abar, cfg, ctx, create_graph=False)
    grad = _flat_grad(theta, loss)
    # independently: freeze each concept's inner gradient at theta0, then differentiate the outer
    # loss of theta -> Merge(theta - lr * g0_n) by central differences
    g0 = _inner_gradients_at(unet, theta, frozen, inner, batches.inner, abar, cfg)

    def outer_at(th):
        params = {**frozen, **th}
        adapted = [{n: th[n] - cfg.inner_lr * g[n] for n in inner} for g in g0]
        return _outer_value(unet, params, adapted, ctx, batches, abar, cfg)

    assert _central_difference(outer_at, theta, grad, seed=4) == pytest.approx(float(grad @ _direction(grad, 4)), rel=1e-5, abs=1e-8)
    # and it differs from the second-order gradient: the Hessian term is really dropped
    with im.double_backward_attention():
        loss2, _ = im.outer_objective(unet, theta, frozen, inner, batches, abar, cfg, ctx, create_graph=True)
        grad2 = _flat_grad(theta, loss2)
    assert not torch.allclose(grad, grad2, rtol=1e-3)


@pytest.mark.parametrize("inner_params", ["kv", "unet"])
def test_truncated_second_order_differentiates_the_last_attacker_step_only(setup, inner_params):
    unet, concepts, prior, abar, ctx, cfg, _ = setup
    cfg = replace(cfg, inner_params=inner_params, inner_steps=2, second_order_steps=1, inner_lr=0.2)
    batches = im._sample_step_batches(concepts, prior, cfg, 1000, torch.Generator().manual_seed(5))
    theta, frozen, inner = _split(unet, cfg)
    with im.double_backward_attention():
        loss, _ = im.outer_objective(unet, theta, frozen, inner, batches, abar, cfg, ctx, create_graph=True)
        grad = _flat_grad(theta, loss)
    # independently: the first attacker step's gradient frozen at theta0, the second one's a
    # function of theta; central differences of that objective
    one = replace(cfg, inner_steps=1)
    g0 = _inner_gradients_at(unet, theta, frozen, inner, [b[:1] for b in batches.inner], abar, one)

    def objective_at(th):
        params = {**frozen, **th}
        with torch.enable_grad():
            adapted = []
            for g, b in zip(g0, batches.inner):
                start = {n: (params[n] - cfg.inner_lr * g[n]).detach().requires_grad_(True) for n in inner}
                adapted.append({n: v.detach() for n, v in im.simulate_attacker(unet, {**params, **start}, inner, b[1:], abar, one, create_graph=False).items()})
        return _outer_value(unet, params, adapted, ctx, batches, abar, cfg)

    assert _central_difference(objective_at, theta, grad, seed=6) == pytest.approx(float(grad @ _direction(grad, 6)), rel=1e-5, abs=1e-8)
    # it is neither the full second-order gradient nor the first-order one, and second_order_steps
    # equal to inner_steps is the full unroll
    with im.double_backward_attention():
        full = {k: _flat_grad(theta, im.outer_objective(unet, theta, frozen, inner, batches, abar, replace(cfg, second_order_steps=k), ctx, create_graph=True)[0]) for k in (0, 2)}
    first = _flat_grad(theta, im.outer_objective(unet, theta, frozen, inner, batches, abar, cfg, ctx, create_graph=False)[0])
    assert torch.equal(full[0], full[2])
    assert not torch.allclose(grad, full[0], rtol=1e-3) and not torch.allclose(grad, first, rtol=1e-3)


def _inner_gradients_at(unet, theta, frozen, inner, batches, abar, cfg):
    """Each concept's attacker update direction at theta, as constants: (theta - phi_n) / lr after
    ``cfg.inner_steps`` steps on ``batches[n]``."""
    params0 = {**frozen, **{n: v.detach() for n, v in theta.items()}}
    out = []
    for b in batches:
        adapted = im.simulate_attacker(unet, {**frozen, **{n: v.detach().requires_grad_(True) for n, v in theta.items()}}, inner, b, abar, cfg, create_graph=False)
        out.append({n: (params0[n] - adapted[n].detach()) / cfg.inner_lr for n in inner})
    return out


def _outer_value(unet, params, adapted, ctx, batches, abar, cfg):
    """MIMA's outer loss (denoising utility, prior weight) at the merge of ``adapted``, as a float."""
    merged, _ = im.merge_adapted(params, adapted, ctx)
    concept = sum(im.diffusion_loss_at(unet, {**params, **merged}, d, abar) for d, _ in batches.outer)
    utility = sum(im.diffusion_loss_at(unet, params, p, abar) for _, p in batches.outer)
    return (-concept + cfg.prior_weight * utility).item()


def _direction(grad, seed):
    d = torch.randn(grad.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return d / d.norm()


def _central_difference(f, theta, grad, seed, h=1e-5):
    """(f(theta + h d) - f(theta - h d)) / 2h along the unit direction ``_direction(grad, seed)``."""
    direction = _direction(grad, seed)
    moved = lambda eps: {n: v.detach() + eps * direction[o : o + v.numel()].view_as(v) for (n, v), o in zip(theta.items(), _offsets(theta))}
    return (f(moved(h)) - f(moved(-h))) / (2 * h)


def _offsets(theta):
    out, o = [], 0
    for v in theta.values():
        out.append(o)
        o += v.numel()
    return out


def test_attacker_never_mutates_the_weights_it_is_given(setup):
    unet, concepts, prior, abar, ctx, cfg, batches = setup
    theta, frozen, inner = _split(unet, cfg)
    before = {n: v.detach().clone() for n, v in theta.items()}
    module_before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    adapted = im.simulate_attacker(unet, {**frozen, **theta}, inner, batches.inner[0], abar, replace(cfg, inner_steps=2), create_graph=True)
    assert all(torch.equal(before[n], theta[n].detach()) for n in theta)
    assert all(torch.equal(module_before[n], p.detach()) for n, p in unet.named_parameters())
    assert any(not torch.equal(adapted[n].detach(), before[n]) for n in inner)


def test_alternating_leaves_no_graph_through_the_merge(setup):
    unet, concepts, prior, abar, ctx, cfg, batches = setup
    theta, frozen, inner = _split(unet, cfg)
    adapted = [im.simulate_attacker(unet, {**frozen, **{n: v.detach() for n, v in theta.items()}}, inner, b, abar, cfg, False) for b in batches.inner]
    with torch.no_grad():
        merged, _ = im.merge_adapted({**frozen, **theta}, adapted, ctx)
    assert all(v.grad_fn is None and not v.requires_grad for v in merged.values())
    result = im.run_mima(unet, concepts, prior, abar.float().double(), replace(cfg, mode="alternating"), ctx, seed=0, steps=2, progress=False)
    assert len(result.log["step"]) == 2 and all(not v.requires_grad for v in result.theta.values())


@pytest.mark.parametrize("mode", ["second_order", "first_order", "alternating"])
def test_run_raises_concept_loss_at_merged_attacker(setup, mode):
    unet, concepts, prior, abar, ctx, cfg, batches = setup
    cfg = replace(cfg, mode=mode, outer_lr=1e-2, steps=6)
    theta, frozen, inner = _split(unet, cfg)
    evals = im.evaluation_batches(concepts, prior, cfg, 1000, seed=0)
    start = im.evaluate_objective(unet, theta, frozen, inner, evals, abar, cfg, ctx)
    result = im.run_mima(unet, concepts, prior, abar, cfg, ctx, seed=0, progress=False)
    end = im.evaluate_objective(unet, result.theta, frozen, inner, evals, abar, cfg, ctx)
    assert end["concept_loss"] > start["concept_loss"]
    assert all(torch.equal(p, unet.get_parameter(n)) for n, p in theta.items())  # module untouched


def test_batched_losses_equal_separate_calls(setup):
    """One UNet call on concatenated batches gives each batch's own loss (no cross-sample mixing)."""
    unet, concepts, prior, abar, ctx, cfg, batches = setup
    params = dict(unet.named_parameters())
    pair = batches.outer[0]
    together = im.diffusion_losses_at(unet, params, list(pair), abar)
    apart = [im.diffusion_loss_at(unet, params, b, abar) for b in pair]
    assert torch.allclose(torch.stack(together), torch.stack(apart), rtol=1e-12, atol=0)
    assert not torch.allclose(together[0], together[1])


def test_bounded_objectives(setup):
    """cap: the concept term stops at the cap; gap: neg minus the concept loss at theta."""
    unet, concepts, prior, abar, ctx, cfg, batches = setup
    theta, frozen, inner = _split(unet, cfg)
    losses = {}
    for objective, cap in (("neg", 1.0), ("gap", 1.0), ("cap", 1e-6)):
        c = replace(cfg, objective=objective, objective_cap=cap)
        losses[objective], info = im.outer_objective(unet, theta, frozen, inner, batches, abar, c, ctx, create_graph=False)
    params = {**frozen, **theta}
    at_theta = sum(im.diffusion_losses_at(unet, params, [d for d, _ in batches.outer], abar))
    utility = sum(im.diffusion_losses_at(unet, params, [p for _, p in batches.outer], abar))
    assert torch.allclose(losses["gap"], losses["neg"] + at_theta, atol=1e-10)
    # every concept loss is above 1e-6, so the capped term is the constant -n * cap
    assert torch.allclose(losses["cap"], -2e-6 + cfg.prior_weight * utility, atol=1e-10)
    assert _flat_grad(theta, losses["cap"]).abs().sum() > 0  # the utility term still moves theta


def test_ratio_objective_divides_each_concept_loss_at_the_merged_attacker_by_its_loss_at_theta(setup):
    unet, concepts, prior, abar, ctx, cfg, batches = setup
    theta, frozen, inner = _split(unet, cfg)
    loss, info = im.outer_objective(unet, theta, frozen, inner, batches, abar, replace(cfg, objective="ratio"), ctx, create_graph=False)
    # the same merged attacker, built step by step from the public pieces
    params = {**frozen, **theta}
    adapted = [im.simulate_attacker(unet, params, inner, b, abar, cfg, False) for b in batches.inner]
    merged, _ = im.merge_adapted(params, adapted, ctx)
    at_merged = im.diffusion_losses_at(unet, {**params, **merged}, [d for d, _ in batches.outer], abar)
    at_theta = im.diffusion_losses_at(unet, params, [d for d, _ in batches.outer], abar)
    utility = sum(im.diffusion_losses_at(unet, params, [p for _, p in batches.outer], abar))
    ratios = [m / t for m, t in zip(at_merged, at_theta)]
    assert all(r > 0 for r in ratios) and not torch.allclose(ratios[0], ratios[1])
    assert torch.allclose(loss, -sum(ratios) + cfg.prior_weight * utility, atol=1e-10)
    assert info["concept_loss"] == pytest.approx(sum(at_merged).item() / 2, rel=1e-10)  # still the loss, not the ratio
    with pytest.raises(Exception, match="objective"):
        replace(cfg, objective="ratios")


def _unet_calls(unet):
    """A counter of the UNet's forward calls (a forward pre-hook) and its handle."""
    calls = []
    return calls, unet.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))


def test_grouped_predictions_equal_separate_calls_in_one_unet_call(setup):
    """Groups that differ in cross-attention K/V only go through one UNet call, each group with
    its own K/V weights: predictions and every group's gradient equal separate calls."""
    unet, concepts, prior, abar, ctx, cfg, batches = setup
    base = dict(unet.named_parameters())
    kv = im.parameter_names(unet, "kv")
    g = torch.Generator().manual_seed(5)
    variants = [{n: (base[n].detach() + 0.1 * k * torch.randn(base[n].shape, generator=g, dtype=base[n].dtype)).requires_grad_(True) for n in kv} for k in range(3)]
    groups = [({**base, **v}, list(pair)) for v, pair in zip(variants, [batches.outer[0], batches.outer[1], batches.inner[0][0]])]
    calls, hook = _unet_calls(unet)
    together = im.grouped_predictions(unet, groups, kv, abar)
    hook.remove()
    assert calls == [12]  # three groups of two batches of two, one call
    apart = [im.predictions_at(unet, params, b, abar) for params, b in groups]
    for (p1, n1), (p2, n2) in zip(together, apart):
        assert torch.allclose(p1, p2, rtol=1e-10, atol=1e-12) and torch.equal(n1, n2)
    weights = torch.randn(len(groups), generator=g, dtype=torch.float64)
    def grads(outs):
        loss = sum(w * (p - n).pow(2).mean() for w, (p, n) in zip(weights, outs))
        return torch.autograd.grad(loss, [v[n] for v in variants for n in kv])
    for a, b in zip(grads(together), grads(apart)):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    assert all("forward" not in unet.get_submodule(n.rpartition(".")[0]).__dict__ for n in kv)  # modules restored


def test_grouped_predictions_refuse_groups_that_differ_elsewhere_and_restore_modules(setup):
    unet, concepts, prior, abar, ctx, cfg, batches = setup
    base = dict(unet.named_parameters())
    kv = im.parameter_names(unet, "kv")
    other = next(n for n in base if n not in kv)
    groups = [(base, [batches.outer[0][0]]), ({**base, other: base[other] + 1.0}, [batches.outer[1][0]])]
    with pytest.raises(ValueError, match="differ outside"):
        im.grouped_predictions(unet, groups, kv, abar)
    # a tensor outside Linear layers among the differing ones: separate calls, in order
    calls, hook = _unet_calls(unet)
    out = im.grouped_predictions(unet, groups, kv + [other], abar)
    hook.remove()
    assert calls == [2, 2]
    assert torch.allclose(out[1][0], im.predictions_at(unet, groups[1][0], groups[1][1], abar)[0], rtol=1e-12, atol=0)
    # a failing call inside the grouped block leaves no patched module behind
    bad = [(base, [batches.outer[0][0]]), ({**base, kv[0]: base[kv[0]][:, :-1]}, [batches.outer[1][0]])]
    with pytest.raises(RuntimeError):
        im.grouped_predictions(unet, bad, kv, abar)
    assert all("forward" not in m.__dict__ for m in unet.modules())


@pytest.mark.parametrize("create_graph", [True, False])
def test_batched_attackers_equal_one_attacker_per_concept(setup, create_graph):
    """simulate_attackers (every concept's inner step in one UNet call) gives each concept the
    weights simulate_attacker gives it alone, and the same gradient back to theta."""
    unet, concepts, prior, abar, ctx, cfg, batches = setup
    cfg = replace(cfg, inner_steps=2)
    batches = im._sample_step_batches(concepts, prior, cfg, 1000, torch.Generator().manual_seed(6))  # a pair per inner step
    theta, frozen, inner = _split(unet, cfg)
    params = {**frozen, **theta}
    calls, hook = _unet_calls(unet)
    together = im.simulate_attackers(unet, params, inner, batches.inner, abar, cfg, create_graph)
    hook.remove()
    assert len(calls) == cfg.inner_steps
    apart = [im.simulate_attacker(unet, params, inner, b, abar, cfg, create_graph) for b in batches.inner]
    for a, b in zip(together, apart):
        assert all(torch.allclose(a[n], b[n], rtol=1e-10, atol=1e-12) for n in inner)
    probe = lambda out: sum((k + 1.0) * v.pow(2).sum() for k, a in enumerate(out) for v in a.values())  # noqa: E731
    for x, y in zip(torch.autograd.grad(probe(together), list(theta.values())), torch.autograd.grad(probe(apart), list(theta.values()))):
        assert torch.allclose(x, y, rtol=1e-9, atol=1e-12)
    # the whole-UNet attacker keeps one call per concept and step
    calls, hook = _unet_calls(unet)
    im.simulate_attackers(unet, {n: p for n, p in unet.named_parameters()}, im.parameter_names(unet, "unet"), batches.inner, abar, cfg, False)
    hook.remove()
    assert len(calls) == len(batches.inner) * cfg.inner_steps


@pytest.mark.parametrize("mode", ["second_order", "first_order", "alternating"])
def test_mixed_precision_runs_the_unet_in_bfloat16_and_keeps_the_weights_float32(setup, mode):
    """``immunize.mixed_precision: bf16``: the UNet's layers compute in bfloat16 in every mode
    (seen by a forward hook), the losses differ from float32's by rounding only, and the immunized
    tensors come back float32. float64 is never autocast, so this runs in float32."""
    unet, concepts, prior, abar, ctx, cfg, _ = setup
    unet = unet.float()
    f32 = lambda c: im.ConceptData(c.name, c.latents.float(), c.text.float(), c.target_rows)  # noqa: E731
    concepts, prior, abar = [f32(c) for c in concepts], f32(prior), abar.float()
    cfg = replace(cfg, mode=mode, outer_lr=1e-2, steps=3)
    seen: set = set()
    linear = next(m for m in unet.modules() if isinstance(m, torch.nn.Linear))
    hook = linear.register_forward_hook(lambda module, inputs, output: seen.add(output.dtype))
    runs = {}
    try:
        for mp in ("fp32", "bf16"):
            seen.clear()
            runs[mp] = im.run_mima(unet, concepts, prior, abar, replace(cfg, mixed_precision=mp), ctx, seed=0, progress=False)
            assert seen == ({torch.float32} if mp == "fp32" else {torch.bfloat16}), (mp, seen)
    finally:
        hook.remove()
    assert all(v.dtype == torch.float32 for v in runs["bf16"].theta.values())
    full, half = (torch.tensor(runs[mp].log["loss"]) for mp in ("fp32", "bf16"))
    assert not torch.equal(full, half)
    assert torch.allclose(full, half, rtol=0.05, atol=1e-3), (full, half)


@pytest.fixture()
def token_setup(setup):
    """The micro setup with a micro CLIP text encoder (width 6, as the micro UNet's conditioning):
    each concept's captions hold its own word (ids 1 and 2), which a ``+token`` attacker learns."""
    from transformers import CLIPTextConfig, CLIPTextModel

    unet, _, prior, abar, ctx, cfg, _ = setup
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=20, hidden_size=6, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=5,
                            bos_token_id=0, eos_token_id=19, pad_token_id=19)
    encoder = CLIPTextModel(config).double().eval()
    g = torch.Generator().manual_seed(7)

    def concept(name, word, n=6):
        ids = torch.randint(3, 19, (n, 5), generator=g)
        ids[:, 2] = word
        with torch.no_grad():
            text = encoder(ids)[0]
        rows = torch.randn(2, 6, generator=g, dtype=torch.float64)
        return im.ConceptData(name, torch.randn(n, 4, 4, 4, generator=g, dtype=torch.float64), text, rows, im.TokenInputs(ids, [word], encoder))

    concepts = [concept("a", 1), concept("b", 2)]
    ctx = im.MergeContext(ctx.factor, [c.target_rows for c in concepts])
    return unet, encoder, concepts, prior, abar, ctx, replace(cfg, inner_steps=2)


@pytest.mark.parametrize("inner_params", ["kv+token", "token"])
def test_token_attacker_second_order_matches_finite_differences(token_setup, inner_params):
    """With the concept words' embeddings in the attacker's set, the outer gradient goes back through
    their steps (text encoder and UNet): it matches central differences of the whole objective,
    and it is not the gradient of the attacker without them."""
    unet, encoder, concepts, prior, abar, ctx, cfg = token_setup
    cfg = replace(cfg, inner_params=inner_params)
    batches = im._sample_step_batches(concepts, prior, cfg, 1000, torch.Generator().manual_seed(8))
    theta, frozen, inner = _split(unet, cfg)
    encoder_before = {n: p.detach().clone() for n, p in encoder.named_parameters()}
    with im.double_backward_attention():
        loss, _ = im.outer_objective(unet, theta, frozen, inner, batches, abar, cfg, ctx, create_graph=True)
        grad = _flat_grad(theta, loss)

    def objective_at(th):
        with torch.enable_grad():
            return im.outer_objective(unet, th, frozen, inner, batches, abar, cfg, ctx, create_graph=False)[0].item()

    assert _central_difference(objective_at, theta, grad, seed=9) == pytest.approx(float(grad @ _direction(grad, 9)), rel=1e-5, abs=1e-8)
    without = replace(cfg, inner_params="kv")
    with im.double_backward_attention():
        plain = _flat_grad(theta, im.outer_objective(unet, theta, frozen, im.parameter_names(unet, "kv"), batches, abar, without, ctx, create_graph=True)[0])
    assert not torch.allclose(grad, plain, rtol=1e-3)
    # the text encoder is frozen: untouched, and no gradient accumulates into it
    assert all(torch.equal(encoder_before[n], p.detach()) and p.grad is None for n, p in encoder.named_parameters())


def test_gap_objective_with_the_token_attacker_measures_the_clean_loss_on_the_written_captions(token_setup):
    """The gap objective's clean term L(theta; D) reads D as written: with a token-only attacker
    (nothing merged) the gap is the loss change the learned vectors make, not zero."""
    unet, encoder, concepts, prior, abar, ctx, cfg = token_setup
    cfg = replace(cfg, inner_params="token", objective="gap", inner_lr=5.0)
    batches = im._sample_step_batches(concepts, prior, cfg, 1000, torch.Generator().manual_seed(8))
    theta, frozen, inner = _split(unet, cfg)
    with torch.enable_grad():
        gap_loss, parts = im.outer_objective(unet, theta, frozen, inner, batches, abar, cfg, ctx, create_graph=False)
        neg_loss, _ = im.outer_objective(unet, theta, frozen, inner, batches, abar, replace(cfg, objective="neg"), ctx, create_graph=False)
    params = {**frozen, **theta}
    written = sum(im.diffusion_loss_at(unet, params, batches.outer[n][0], abar) for n in range(len(concepts))).item()
    learned = parts["concept_loss"] * len(concepts)
    # gap - neg = the clean term, the loss on the captions as written, which the vectors change
    assert (gap_loss - neg_loss).item() == pytest.approx(written, rel=1e-6)
    assert abs(learned - written) > 1e-4 * written


def test_token_attacker_steps_each_concept_word_embedding(token_setup):
    """One attacker step moves each concept's own word embedding by -inner_lr times the gradient of
    its loss (recomputed here with the embedding as an explicit leaf), and nothing else of it; the
    batched attackers give the same vectors as one attacker per concept."""
    unet, encoder, concepts, prior, abar, ctx, cfg = token_setup
    cfg = replace(cfg, inner_params="token", inner_steps=1)
    batches = im._sample_step_batches(concepts, prior, cfg, 1000, torch.Generator().manual_seed(10))
    params = {n: p.detach() for n, p in unet.named_parameters()}
    together = im.simulate_attackers(unet, params, [], batches.inner, abar, cfg, False)
    table = encoder.get_input_embeddings().weight.detach()
    for n, (concept, adapted) in enumerate(zip(concepts, together)):
        word = concept.tokens.words[0]
        assert list(adapted) == [f"token:{word}"]
        start = table[word].clone().requires_grad_(True)
        d, p = batches.inner[n][0]
        text = concept.tokens.states(d.ids, {f"token:{word}": start})
        # at the start embedding the re-encoded captions are the precomputed ones
        with torch.no_grad():
            assert torch.allclose(concept.tokens.states(d.ids, {f"token:{word}": table[word]}), d.text, atol=1e-12)
        loss = sum(im.diffusion_losses_at(unet, params, [replace(d, text=text), p], abar)[k] * w for k, w in enumerate([1.0, cfg.prior_weight]))
        (g,) = torch.autograd.grad(loss, [start])
        assert torch.allclose(adapted[f"token:{word}"], table[word] - cfg.inner_lr * g, atol=1e-12)
        alone = im.simulate_attacker(unet, params, [], batches.inner[n], abar, cfg, False)
        assert torch.allclose(alone[f"token:{word}"], adapted[f"token:{word}"], atol=1e-12)


def test_token_attacker_needs_token_ids_and_one_process(setup):
    unet, concepts, prior, abar, ctx, cfg, _ = setup
    cfg = replace(cfg, inner_params="kv+token")
    batches = im._sample_step_batches(concepts, prior, cfg, 1000, torch.Generator().manual_seed(11))
    theta, frozen, inner = _split(unet, cfg)
    with pytest.raises(ValueError, match=r"no token ids; build it with concept_data"):
        im.outer_objective(unet, theta, frozen, inner, batches, abar, cfg, ctx, create_graph=False)
    with pytest.raises(ValueError, match=r"runs in one process in the second_order or first_order mode"):
        im.run_mima(unet, concepts, prior, abar, replace(cfg, mode="alternating", steps=1), ctx, seed=0, progress=False)
    assert im.parameter_names(unet, "kv+token") == im.parameter_names(unet, "kv") and im.parameter_names(unet, "token") == []


def test_lora_attacker_second_order_matches_finite_differences(setup):
    """The LoRA attacker (factors on every attention projection, B starting at zero): the outer
    gradient through its two steps and the merge matches central differences."""
    unet, concepts, prior, abar, ctx, cfg, _ = setup
    cfg = replace(cfg, inner_params="lora", inner_lora_rank=2, inner_steps=2)
    batches = im._sample_step_batches(concepts, prior, cfg, 1000, torch.Generator().manual_seed(12))
    theta, frozen, inner = _split(unet, cfg)
    with im.double_backward_attention():
        loss, _ = im.outer_objective(unet, theta, frozen, inner, batches, abar, cfg, ctx, create_graph=True)
        grad = _flat_grad(theta, loss)

    def objective_at(th):
        with torch.enable_grad():
            return im.outer_objective(unet, th, frozen, inner, batches, abar, cfg, ctx, create_graph=False)[0].item()

    assert _central_difference(objective_at, theta, grad, seed=13) == pytest.approx(float(grad @ _direction(grad, 13)), rel=1e-5, abs=1e-8)


def test_lora_attacker_first_step_is_the_gradient_projected_on_its_a_factor(setup):
    """From B = 0 the first LoRA step moves B alone: ``W' = W - lr * G A^T A`` with G the weight's
    gradient at W, A the fixed gaussian start (std 1/r); a rank-r change, not the full-rank SGD step.
    Every attention projection's weight is in the set, and the batched attackers agree."""
    unet, concepts, prior, abar, ctx, cfg, batches = setup
    cfg = replace(cfg, inner_params="lora", inner_lora_rank=2, inner_steps=1)
    params = {n: p.detach() for n, p in unet.named_parameters()}
    inner = im.parameter_names(unet, "lora")
    assert inner and all(any(n.endswith(f".{t}.weight") for t in ("to_q", "to_k", "to_v", "to_out.0")) for n in inner)
    assert {n for n in inner if ".attn1." in n} and {n for n in inner if ".attn2." in n}
    adapted = im.simulate_attacker(unet, params, inner, batches.inner[0], abar, cfg, create_graph=False)
    start = im._lora_start(params, inner, 2)
    leaves = {n: params[n].clone().requires_grad_(True) for n in inner}
    d, p = batches.inner[0][0]
    loss = sum(w * l for w, l in zip([1.0, cfg.prior_weight], im.diffusion_losses_at(unet, {**params, **leaves}, [d, p], abar)))
    grads = dict(zip(inner, torch.autograd.grad(loss, list(leaves.values()))))
    for n in inner:
        A = start[f"lora_A:{n}"].detach()
        assert A.std().item() == pytest.approx(0.5, rel=0.5)
        assert torch.allclose(adapted[n], params[n] - cfg.inner_lr * grads[n] @ A.T @ A, atol=1e-12)
        assert torch.linalg.matrix_rank(adapted[n] - params[n], rtol=1e-6).item() <= 2  # above W + BA - W rounding
    together = im.simulate_attackers(unet, params, inner, batches.inner, abar, cfg, False)
    assert all(torch.allclose(together[0][n], adapted[n], atol=1e-12) for n in inner)


def test_lora_attacker_per_step_start_draws_a_from_the_batch(setup):
    """``inner_lora_start: per_step``: the first step is ``W - lr G A^T A`` with A drawn from the
    concept's first batch, the same A whenever that batch comes again, another for another batch
    (a fresh A at every outer step); the batched attackers give each concept its own."""
    unet, concepts, prior, abar, ctx, cfg, batches = setup
    cfg = replace(cfg, inner_params="lora", inner_lora_rank=2, inner_steps=1, inner_lora_start="per_step")
    params = {n: p.detach() for n, p in unet.named_parameters()}
    inner = im.parameter_names(unet, "lora")
    pairs = batches.inner[0]
    adapted = im.simulate_attacker(unet, params, inner, pairs, abar, cfg, create_graph=False)
    again = im.simulate_attacker(unet, params, inner, pairs, abar, cfg, create_graph=False)
    fixed = im.simulate_attacker(unet, params, inner, pairs, abar, replace(cfg, inner_lora_start="fixed"), create_graph=False)
    start = im._lora_start(params, inner, 2, im._batch_seed(pairs[0][0]))
    leaves = {n: params[n].clone().requires_grad_(True) for n in inner}
    loss = sum(w * l for w, l in zip([1.0, cfg.prior_weight], im.diffusion_losses_at(unet, {**params, **leaves}, list(pairs[0]), abar)))
    grads = dict(zip(inner, torch.autograd.grad(loss, list(leaves.values()))))
    pooled = torch.cat([start[f"lora_A:{n}"].detach().flatten() for n in inner])
    assert pooled.std().item() == pytest.approx(1 / 2, rel=0.1)  # std 1/r over every entry
    for n in inner:
        A = start[f"lora_A:{n}"].detach()
        assert torch.allclose(adapted[n], params[n] - cfg.inner_lr * grads[n] @ A.T @ A, atol=1e-12)
        assert torch.equal(adapted[n], again[n])
    assert any(not torch.allclose(adapted[n], fixed[n]) for n in inner)
    other = im._sample_step_batches(concepts, prior, cfg, 1000, torch.Generator().manual_seed(99)).inner[0][0][0]
    assert im._batch_seed(other) != im._batch_seed(pairs[0][0])
    together = im.simulate_attackers(unet, params, inner, batches.inner, abar, cfg, False)
    singles = [im.simulate_attacker(unet, params, inner, b, abar, cfg, create_graph=False) for b in batches.inner]
    assert all(torch.allclose(t[n], s[n], atol=1e-12) for t, s in zip(together, singles) for n in inner)
