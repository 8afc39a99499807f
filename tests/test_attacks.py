"""Each attack trains exactly what it claims, from the saved folder, and the attack metrics compute
what DESIGN section 7 defines."""

import json
import math

import pytest
import torch

from mci_lib import artifacts, attacks, data, metrics, models
from mci_lib.models import is_cross_attention_kv


@pytest.fixture(scope="module")
def saved_micro(released_micro):
    return released_micro


def _data(micro_world, micro_params, targets):
    records = data.read_index(micro_world)
    return attacks.toy_attack_data(micro_world, records, micro_params.world, targets)


def _run(kind, folder, concepts, micro_params, steps=2, lr=1e-2):
    states = []
    cfg = micro_params.attack
    budget = attacks.Budget(lr, steps, 2)
    for step, pipe in attacks.attack(kind, folder, concepts, budget, cfg, micro_params.sampling, 0, [1, steps], progress=False):
        states.append((step, {k: v.detach().clone() for k, v in pipe.unet.state_dict().items()}, pipe.text_encoder.get_input_embeddings().weight.detach().clone(), pipe))
    return states


def test_full_fine_tuning_changes_the_unet_and_not_the_released_folder(saved_micro, micro_world, micro_params):
    before = (saved_micro / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    states = _run("full", saved_micro, _data(micro_world, micro_params, ["star"]), micro_params)
    assert [s for s, *_ in states] == [0, 1, 2]
    first, last = states[0][1], states[-1][1]
    changed = [k for k in first if not torch.equal(first[k], last[k])]
    assert any("conv_in" in k for k in changed) and any(is_cross_attention_kv(k) for k in changed)
    assert (saved_micro / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == before


def test_lora_trains_only_adapter_weights(saved_micro, micro_world, micro_params):
    states = _run("lora", saved_micro, _data(micro_world, micro_params, ["star"]), micro_params)
    last = states[-1][1]
    lora = [k for k in last if "lora_" in k]
    assert lora, "no LoRA weights in the attacked UNet"
    pipe = models.load_pipeline(saved_micro)
    base = pipe.unet.state_dict()
    for k, v in last.items():
        if "lora_" not in k:
            assert torch.equal(v, base[k.replace(".base_layer", "")]), k
    assert any(not torch.equal(states[1][1][k], last[k]) for k in lora)


def test_textual_inversion_changes_only_the_new_token(saved_micro, micro_world, micro_params):
    states = _run("textual_inversion", saved_micro, _data(micro_world, micro_params, ["p1"]), micro_params, lr=0.1)
    pipe = states[-1][3]
    token_id = pipe.tokenizer.convert_tokens_to_ids("<p1>")
    start, end = states[0][2], states[-1][2]
    moved = (start - end).abs().sum(1).nonzero().flatten().tolist()
    assert moved == [token_id]
    assert all(torch.equal(states[0][1][k], states[-1][1][k]) for k in states[0][1])


def test_multi_vector_textual_inversion_learns_each_new_token_and_prompts_with_all(saved_micro, micro_world, micro_params):
    from dataclasses import replace

    cfg = replace(micro_params.attack, num_vectors=3)
    concepts = _data(micro_world, micro_params, ["p1"])
    assert concepts[0].captions_for("textual_inversion", 3)[0] == "a photo of <p1> <p1>_1 <p1>_2 badge"
    assert concepts[0].captions_for("custom_diffusion", attacks.token_vectors("custom_diffusion", cfg))[0] == "a photo of <p1> badge"
    seen = []
    for step, pipe in attacks.attack("textual_inversion", saved_micro, concepts, attacks.Budget(0.1, 2, 2), cfg, micro_params.sampling, 0, [2], progress=False):
        seen.append(pipe.text_encoder.get_input_embeddings().weight.detach().clone())
    ids = pipe.tokenizer.convert_tokens_to_ids(["<p1>", "<p1>_1", "<p1>_2"])
    # the expanded prompt tokenizes to the three new tokens, in order, and nothing else new
    prompt_ids = pipe.tokenizer("a photo of <p1> <p1>_1 <p1>_2 badge").input_ids
    assert [i for i in prompt_ids if i in ids] == ids
    moved = (seen[0] - seen[-1]).abs().sum(1).nonzero().flatten().tolist()
    assert moved == sorted(ids)
    with pytest.raises(Exception, match="num_vectors"):
        replace(micro_params.attack, num_vectors=0)


def test_custom_diffusion_changes_kv_and_the_token(saved_micro, micro_world, micro_params):
    states = _run("custom_diffusion", saved_micro, _data(micro_world, micro_params, ["p1"]), micro_params)
    first, last = states[0][1], states[-1][1]
    changed = {k for k in first if not torch.equal(first[k], last[k])}
    assert changed and all(is_cross_attention_kv(k) for k in changed)
    token_id = states[-1][3].tokenizer.convert_tokens_to_ids("<p1>")
    assert (states[0][2] - states[-1][2]).abs().sum(1).nonzero().flatten().tolist() == [token_id]


@pytest.mark.parametrize("kind", ["dreambooth", "dreambooth_lora"])
def test_dreambooth_variants_run_with_prior_preservation(kind, saved_micro, micro_world, micro_params):
    states = _run(kind, saved_micro, _data(micro_world, micro_params, ["p1"]), micro_params)
    assert [s for s, *_ in states] == [0, 1, 2]
    first, last = states[1][1], states[-1][1]  # step 1 already carries the LoRA weights
    assert any(not torch.equal(first[k], last[k]) for k in first)


def test_attack_refuses_an_unknown_kind_and_missing_class_prompt(saved_micro, micro_world, micro_params):
    with pytest.raises(ValueError, match="unknown attack"):
        next(attacks.attack("finetune", saved_micro, [], attacks.Budget(1e-3, 1), micro_params.attack, micro_params.sampling, 0, [1]))
    shapes = _data(micro_world, micro_params, ["star"])
    with pytest.raises(ValueError, match="class_prompt"):
        next(attacks.attack("dreambooth", saved_micro, shapes, attacks.Budget(1e-3, 1), micro_params.attack, micro_params.sampling, 0, [1]))


def test_sgr_msgr_and_steps_to_relearn():
    assert metrics.sgr(0.8, 0.2) == pytest.approx(75.0)
    assert metrics.sgr(0.5, 0.75) == pytest.approx(-50.0)
    assert metrics.sgr(0.0, 0.0) == 0.0 and math.isnan(metrics.sgr(0.0, 0.3))
    assert metrics.msgr([0.8, 0.4, 0.0], [0.2, 0.4, 0.5]) == pytest.approx(37.5)  # the nan pair is skipped
    assert metrics.steps_to_relearn([50, 100, 150], [0.1, 0.6, 0.9], 1.0, 200) == 100
    assert metrics.steps_to_relearn([50, 100], [0.1, 0.2], 1.0, 200) == 200
    assert metrics.rsgr(60.0, 10.0) == 50.0


def test_frechet_distance_of_shifted_gaussians():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 3, generator=g)
    b = torch.randn(4000, 3, generator=g)
    assert metrics.frechet_distance(a, b) == pytest.approx(0.0, abs=0.02)
    shift = torch.tensor([2.0, 0.0, 0.0])
    assert metrics.frechet_distance(a, b + shift) == pytest.approx(4.0, abs=0.1)
    # a scaled copy: |mu|^2 = 0, tr(S + 4S - 2*2S) = tr(S) = 3
    assert metrics.frechet_distance(a, 2 * b) == pytest.approx(3.0, abs=0.15)


def test_attack_summary_pairs_runs_by_seed_step_and_concept():
    rows = []
    for method, pres in (("none", {50: 0.6, 100: 1.0}), ("mima", {50: 0.0, 100: 0.5})):
        for seed in (0, 1):
            for step, value in ((0, 0.0), *pres.items()):
                rows.append({"attack": "full", "method": method, "seed": seed, "step": step, "concept": "star", "presence": value, "sim": 0.5})
    s = metrics.attack_summary(rows, {"star": 1.0}, budget=100)["full"]["mima"]
    assert s["msgr_presence"] == pytest.approx((100.0 + 50.0) / 2)
    assert s["msgr_sim"] == pytest.approx(0.0)
    assert s["steps_to_relearn"]["star"] == {"without": 50.0, "with": 100.0, "ratio": 2.0}
    assert s["final_presence"] == 0.5 and s["final_presence_without"] == 1.0


def test_msgr_verdict_reads_the_spread_across_seeds():
    assert metrics.msgr_verdict([40.0, 60.0]) == "slower"
    assert metrics.msgr_verdict([-30.0, -50.0]) == "faster"
    assert metrics.msgr_verdict([5.0, 60.0]) == "no difference"  # mean 32.5 < std 38.9
    assert metrics.msgr_verdict([-10.0, 30.0]) == "no difference"
    assert metrics.msgr_verdict([70.0]) == "one seed"


def test_attack_summary_reports_each_seed_and_the_verdict():
    rows = []
    for method, by_seed in (("none", {0: 1.0, 1: 1.0}), ("mima", {0: 0.5, 1: 0.0})):
        for seed, value in by_seed.items():
            rows.append({"attack": "lora", "method": method, "seed": seed, "step": 10, "concept": "star", "presence": value, "sim": 0.5})
    s = metrics.attack_summary(rows, {"star": 1.0}, budget=10)["lora"]["mima"]
    assert s["msgr_presence_per_seed"] == {0: 50.0, 1: 100.0}
    assert s["msgr_presence_std"] == pytest.approx(35.355, abs=1e-3)
    assert s["verdict"] == "slower"


def test_attack_report_keys_and_the_real_attack_check():
    rows = []
    for method, final in (("none", {"star": 0.9, "heart": 0.5}), ("mima", {"star": 0.45, "heart": 0.5})):
        for seed in (0, 1):
            for concept, value in final.items():
                rows.append({"attack": "full", "method": method, "seed": seed, "step": 100, "concept": concept, "presence": value, "sim": 0.5})
    bar = {"star": 1.0, "heart": 1.0}
    summary = metrics.attack_summary(rows, bar, budget=100)
    utility = {"none": {"presence_mean": 0.9, "frechet": 0.0}, "mima": {"presence_mean": 0.8, "frechet": 1.5}}
    r = metrics.attack_report(rows, summary, {}, utility, {"star": 0.7, "heart": 0.7})
    assert r["msgr"]["full"]["mima"] == pytest.approx(25.0)  # star 50, heart 0
    assert r["worst_case_msgr"]["full"]["mima"] == pytest.approx(25.0)  # not swept: the default point
    assert r["utility_presence"] == {"none": 0.9, "mima": 0.8}
    assert r["no_immunization_final_presence"]["full"] == pytest.approx(0.7)
    assert r["no_immunization_final_presence_per_concept"]["full"] == {"heart": 0.5, "star": 0.9}
    assert r["attack_is_real"] == {"full": False}  # heart stays at 0.5 < 0.7
    assert r["steps_to_relearn_ratio"]["full"]["mima"] == pytest.approx(1.0)


def test_a_metrics_file_with_a_one_seed_spread_is_strict_json_and_its_table_says_n_a(tmp_path):
    # a sweep point scored on one seed has no spread: nan in memory, null on disk, n/a in the table
    report = {"msgr": {"lora": {"mima": 12.34}}, "msgr_std": {"lora": {"mima": float("nan")}}, "verdict": {"lora": {"mima": "one seed"}},
              "msgr_sim": {"lora": {"mima": 3.21}}, "worst_case_msgr": {"lora": {"mima": -7.77}},
              "steps_to_relearn_ratio": {"lora": {"mima": 1.0}}, "attack_is_real": {"lora": True}, "utility_presence": {"mima": 0.8776},
              "per_seed": [1.5, float("-inf")]}
    path = artifacts.write_json(tmp_path / "attack_relearn.json", report)
    strict = json.loads(path.read_text(), parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))
    assert strict["msgr_std"]["lora"]["mima"] is None
    assert strict["per_seed"] == [1.5, None] and strict["msgr"]["lora"]["mima"] == 12.34
    for loaded in (report, strict):
        row = metrics.msgr_table({"relearn": loaded})[0]
        assert (row["msgr"], row["msgr_std"], row["msgr_sim"], row["worst_case_msgr"]) == (12.3, "n/a", 3.2, -7.8)


def test_dreambooth_writes_a_distinct_rare_identifier_token_attacks_the_placeholder():
    c = attacks.AttackData("p1", torch.zeros(1, 3, 4, 4, dtype=torch.uint8), ["a photo of <p1> badge"], "<p1>", "badge", "a photo of a badge", "sks")
    assert c.captions_for("dreambooth_lora") == ["a photo of sks badge"]
    assert c.captions_for("dreambooth") == ["a photo of sks badge"]
    assert c.captions_for("textual_inversion") == ["a photo of <p1> badge"]
    assert c.captions_for("custom_diffusion") == ["a photo of <p1> badge"]
    from mci_lib.data import PERSONAL_SUBJECTS

    ids = [s["identifier"] for s in PERSONAL_SUBJECTS.values()]
    assert len(set(ids)) == len(ids)


@pytest.mark.parametrize("kind", ["dreambooth", "dreambooth_lora"])
def test_dreambooth_can_also_train_the_text_encoder(kind, saved_micro, micro_world, micro_params):
    from dataclasses import replace

    cfg = replace(micro_params.attack, train_text_encoder=True)
    released = models.load_pipeline(saved_micro).text_encoder.state_dict()
    trained = None
    for step, pipe in attacks.attack(kind, saved_micro, _data(micro_world, micro_params, ["p1"]), attacks.Budget(1e-2, 2, 2), cfg, micro_params.sampling, 0, [2], progress=False):
        trained = {k: v.detach().clone() for k, v in pipe.text_encoder.state_dict().items()}
    if kind == "dreambooth":
        changed = [k for k in released if not torch.equal(released[k], trained[k])]
        assert any("self_attn" in k for k in changed) and any("mlp" in k for k in changed)
    else:
        lora = [k for k in trained if "lora_" in k]
        assert lora and all(any(t in k for t in attacks.TEXT_LORA_TARGETS) for k in lora)
        for k, v in trained.items():
            if "lora_" not in k:
                assert torch.equal(v, released[k.replace(".base_layer", "")]), k


@pytest.mark.parametrize("weighting", ["none", "v", "min_snr"])
def test_sliced_loss_shares_sum_to_the_weighted_batch_loss(weighting, saved_micro):
    """Each process's share of the data-parallel loss, weighted as the one-process loss is, sums
    to that loss; the weighting is applied (v differs from none)."""
    from diffusers import DDPMScheduler

    from mci_lib.pretrain import diffusion_loss

    pipe = models.load_pipeline(saved_micro)
    ddpm = DDPMScheduler.from_config(pipe.scheduler.config)
    size = pipe.unet.config.sample_size
    latents = torch.randn((5, pipe.unet.config.in_channels, size, size), generator=torch.Generator().manual_seed(3))
    caps = [f"a photo of a red {s}" for s in ("star", "heart", "circle", "cross", "square")]
    with torch.no_grad():
        whole = diffusion_loss(pipe.unet, ddpm, latents, models.text_states(pipe, caps), torch.Generator().manual_seed(7), weighting)
        plain = diffusion_loss(pipe.unet, ddpm, latents, models.text_states(pipe, caps), torch.Generator().manual_seed(7))
        shares = [attacks._sliced_diffusion_loss(pipe, ddpm, latents, caps, torch.Generator().manual_seed(7), r, 3, weighting) for r in range(3)]
    torch.testing.assert_close(sum(shares), whole, rtol=1e-5, atol=1e-6)
    assert (weighting == "none") == bool(torch.isclose(whole, plain))


def test_attack_trains_with_the_configured_loss_weighting(saved_micro, micro_world, micro_params):
    """``attack.loss_weighting`` reaches the attacker's loss: the same run under another weighting
    ends at other weights, and under the same one at the same weights."""
    from dataclasses import replace

    concepts = _data(micro_world, micro_params, ["star"])

    def final(weighting):
        cfg = replace(micro_params.attack, loss_weighting=weighting)
        for _, pipe in attacks.attack("full", saved_micro, concepts, attacks.Budget(1e-2, 3, 2), cfg, micro_params.sampling, 0, [3], progress=False):
            out = torch.cat([p.detach().flatten().clone() for p in pipe.unet.parameters()])
        return out

    none = final("none")
    assert torch.equal(none, final("none"))
    assert not torch.equal(none, final("v"))
    assert not torch.equal(none, final("min_snr"))
