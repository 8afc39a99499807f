from pathlib import Path

import pytest

from mci_lib.config import Params, ParamsError, load_params, params_to_dict

ROOT = Path(__file__).resolve().parents[1]


def test_params_yaml_loads_into_frozen_dataclasses():
    p = load_params(ROOT / "params.yaml")
    assert isinstance(p, Params)
    assert p.world.image_size == 32 and "star" in p.world.shapes
    assert isinstance(p.model.unet_channels, tuple)
    with pytest.raises(Exception):
        p.world.image_size = 64  # frozen


def test_unknown_key_is_refused_and_named(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text((ROOT / "params.yaml").read_text().replace("  unet_steps:", "  unet_stepz:"))
    with pytest.raises(ParamsError, match=r"unknown key 'pretrain.unet_stepz'"):
        load_params(bad)


def test_unknown_section_is_refused(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("seed: 0\nworlds:\n  image_size: 32\n")
    with pytest.raises(ParamsError, match=r"unknown key 'worlds'"):
        load_params(bad)


def test_wrong_type_is_refused_and_named(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("judge:\n  steps: many\n")
    with pytest.raises(ParamsError, match=r"'judge.steps' must be an integer"):
        load_params(bad)


def test_profile_overlays_only_its_keys(tmp_path):
    overlay = tmp_path / "gpu.yaml"
    overlay.write_text("device: cuda\npretrain:\n  unet_steps: 7\n")
    base = load_params(ROOT / "params.yaml")
    p = load_params(ROOT / "params.yaml", profile=overlay)
    assert p.device == "cuda" and p.pretrain.unet_steps == 7
    assert p.pretrain.unet_lr == base.pretrain.unet_lr and p.world == base.world


def test_dotted_overrides_and_manifest_form():
    p = load_params(ROOT / "params.yaml", overrides={"sampling.samples_per_concept": 3})
    assert p.sampling.samples_per_concept == 3
    d = params_to_dict(p)
    assert d["sampling"]["samples_per_concept"] == 3 and isinstance(d["world"]["shapes"], list)
    with pytest.raises(ParamsError, match="sampling.samplez"):
        load_params(ROOT / "params.yaml", overrides={"sampling.samplez": 3})


def test_second_order_steps_beyond_the_attacker_steps_is_refused_and_named():
    p = load_params(ROOT / "params.yaml", overrides={"immunize.second_order_steps": 1})
    assert p.immunize.second_order_steps == 1
    with pytest.raises(ParamsError, match=r"immunize.second_order_steps: 4 is not between 0 .* \(3\)"):
        load_params(ROOT / "params.yaml", overrides={"immunize.inner_steps": 3, "immunize.second_order_steps": 4})


def test_missing_params_file_is_named(tmp_path):
    with pytest.raises(ParamsError, match="nope.yaml"):
        load_params(tmp_path / "nope.yaml")


def test_profile_selected_by_the_params_key_or_by_name(tmp_path):
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "small.yaml").write_text("attack:\n  steps: 7\n  checkpoints: [7]\n")
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text().replace("profile: tiny", "profile: small"))
    p = load_params(params)
    assert p.profile == "small" and p.attack.steps == 7
    (tmp_path / "profiles" / "tiny.yaml").write_text("{}\n")
    # the key an experiment sets (`dvc exp run -S profile=...`) is the same one overrides reach
    assert load_params(params, overrides={"profile": "tiny"}).attack.steps != 7
    with pytest.raises(ParamsError, match=r"known profiles: small"):
        load_params(params, profile="nope")
    (tmp_path / "profiles" / "loop.yaml").write_text("profile: small\n")
    with pytest.raises(ParamsError, match="cannot select another profile"):
        load_params(params, profile="loop")


def test_every_shipped_profile_loads():
    for overlay in sorted((ROOT / "profiles").glob("*.yaml")):
        assert load_params(ROOT / "params.yaml", profile=overlay.stem).profile == overlay.stem


def test_sd15_profile_overlays_the_reference_settings():
    from mci_lib.config import EvalModelsConfig

    base = load_params(ROOT / "params.yaml")
    assert base.eval_models == EvalModelsConfig()  # the tiny profile uses no feature scorers
    p = load_params(ROOT / "params.yaml", profile="sd15")
    assert p.profile == "sd15" and p.device == "cuda"
    assert p.model.pretrained_dir and p.world.image_size == 512
    assert (p.immunize.inner_lr, p.immunize.outer_lr, p.immunize.steps, p.immunize.batch_size) == (5e-6, 3e-5, 1000, 1)
    assert p.immunize.prior_weight == 1.0 and p.erase.lam == 0.5
    assert p.eval_models.clip_dir and p.eval_models.dino_dir
    assert p.world.shapes == base.world.shapes and p.judge == base.judge  # only the named keys change
    # selected by the params key as `dvc exp run -S profile=sd15` does
    assert load_params(ROOT / "params.yaml", overrides={"profile": "sd15"}).world.image_size == 512


def test_eval_models_keys_are_checked(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("eval_models:\n  clip_folder: x\n")
    with pytest.raises(ParamsError, match=r"unknown key 'eval_models.clip_folder'"):
        load_params(bad)
    bad.write_text("eval_models:\n  dino_dir: 3\n")
    with pytest.raises(ParamsError, match=r"'eval_models.dino_dir' must be a string"):
        load_params(bad)


def test_check_paths_names_every_missing_path(tmp_path):
    from mci_lib.config import check_paths

    assert check_paths(load_params(ROOT / "params.yaml"), root=tmp_path) == {}  # tiny: nothing to check
    p = load_params(ROOT / "params.yaml", profile="sd15")
    with pytest.raises(FileNotFoundError) as err:
        check_paths(p, root=tmp_path)
    msg = str(err.value)
    assert "profile 'sd15': 4 local path(s) missing" in msg
    for key, value in (("model.pretrained_dir", p.model.pretrained_dir), ("eval_models.clip_dir", p.eval_models.clip_dir),
                       ("eval_models.dino_dir", p.eval_models.dino_dir), ("eval_models.lpips_weights", p.eval_models.lpips_weights)):
        assert f"{key}: {value} not found" in msg
    assert "huggingface-cli download stable-diffusion-v1-5/stable-diffusion-v1-5 --local-dir models/sd-v1-5" in msg
    assert "openai/clip-vit-large-patch14" in msg and "facebook/dino-vits16" in msg


def test_check_paths_accepts_complete_folders_and_explains_partial_ones(tmp_path):
    from mci_lib.config import check_paths

    overlay = tmp_path / "gpu.yaml"
    overlay.write_text("model:\n  pretrained_dir: sd\neval_models:\n  clip_dir: clip\n  dino_dir: null\n")
    p = load_params(ROOT / "params.yaml", profile=overlay)
    (tmp_path / "sd").mkdir()
    (tmp_path / "sd" / "model_index.json").write_text("{}")
    (tmp_path / "clip").mkdir()
    with pytest.raises(FileNotFoundError) as err:
        check_paths(p, root=tmp_path)
    msg = str(err.value)
    assert "model.pretrained_dir:" in msg and "'unet/' is missing" in msg
    assert "eval_models.clip_dir: clip has no config.json" in msg
    assert "eval_models.dino_dir is not set" in msg
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (tmp_path / "sd" / part).mkdir()
    (tmp_path / "clip" / "config.json").write_text("{}")
    (tmp_path / "dino").mkdir()
    (tmp_path / "dino" / "config.json").write_text("{}")
    ok = load_params(ROOT / "params.yaml", profile=overlay, overrides={"eval_models.dino_dir": str(tmp_path / "dino")})
    found = check_paths(ok, root=tmp_path)
    assert set(found) == {"model.pretrained_dir", "eval_models.clip_dir", "eval_models.dino_dir"}


def test_overrides_as_text_as_papermill_passes_them():
    """``papermill -p overrides '{"immunize.steps": 20}'`` hands the notebook a string."""
    p = load_params(ROOT / "params.yaml", overrides='{"immunize.steps": 20, "attack.seeds": [0, 1]}')
    assert p.immunize.steps == 20 and p.attack.seeds == (0, 1)
    with pytest.raises(ParamsError, match="mapping"):
        load_params(ROOT / "params.yaml", overrides="[1, 2]")
    with pytest.raises(ParamsError, match="immunize.stepz"):
        load_params(ROOT / "params.yaml", overrides='{"immunize.stepz": 20}')


def test_immunize_steps_per_threat():
    """``immunize.steps`` is one number or a mapping threat -> steps; ``for_threat`` resolves it,
    a number set by a profile or override applies to every threat, and the immunizer refuses an
    unresolved mapping."""
    from mci_lib.config import for_threat
    from mci_lib import immunize

    p = load_params(ROOT / "params.yaml", overrides={"immunize.steps": {"relearn": 90, "personalize": 60}})
    assert for_threat(p, "relearn").immunize.steps == 90 and for_threat(p, "personalize").immunize.steps == 60
    assert for_threat(p, "relearn").immunize.outer_lr == p.immunize.outer_lr  # nothing else changes
    flat = load_params(ROOT / "params.yaml", overrides={"immunize.steps": 20})
    assert for_threat(flat, "relearn").immunize.steps == for_threat(flat, "personalize").immunize.steps == 20
    with pytest.raises(ParamsError, match="names every threat"):
        load_params(ROOT / "params.yaml", overrides={"immunize.steps": {"relearn": 90}})
    with pytest.raises(ParamsError, match=r"immunize\.steps\.relearn' must be an integer"):
        load_params(ROOT / "params.yaml", overrides={"immunize.steps": {"relearn": "x", "personalize": 60}})
    with pytest.raises(ParamsError, match="threat 'relearning'"):
        for_threat(p, "relearning")
    with pytest.raises(TypeError, match="for_threat"):
        immunize.immunize("mima", None, [object()], None, None, p.immunize, None, 0)


def test_immunize_parameter_sets_and_utility_weight_per_threat():
    """The attacker's update rule, step size and parameter set, the immunized set and the utility
    weight resolve per threat like ``steps`` (params.yaml immunizes the whole UNet against
    re-learning only, and gives personalization an Adam-like attacker); a mapping's values are
    checked like one value, and the immunizer refuses any unresolved key by name."""
    from mci_lib.config import PER_THREAT, for_threat
    from mci_lib import immunize

    sets = {"immunize.inner_params": {"relearn": "unet", "personalize": "kv"},
            "immunize.outer_params": {"relearn": "unet", "personalize": "cross_attn"},
            "immunize.utility_weight": {"relearn": 100.0, "personalize": 25},
            "immunize.inner_update": {"relearn": "sgd", "personalize": "adam"},
            "immunize.inner_lr": {"relearn": 0.01, "personalize": 3e-3},
            "immunize.mixed_precision": {"relearn": "bf16", "personalize": "fp32"}}
    p = load_params(ROOT / "params.yaml", overrides={**sets, "immunize.steps": 7})
    r, q = for_threat(p, "relearn").immunize, for_threat(p, "personalize").immunize
    assert (r.inner_params, r.outer_params, r.utility_weight, r.steps) == ("unet", "unet", 100.0, 7)
    assert (q.inner_params, q.outer_params, q.utility_weight, q.steps) == ("kv", "cross_attn", 25.0, 7)
    assert (r.inner_update, r.inner_lr, q.inner_update, q.inner_lr) == ("sgd", 0.01, "adam", 3e-3)
    assert (r.mixed_precision, q.mixed_precision) == ("bf16", "fp32")
    assert set(PER_THREAT) >= {"steps", "inner_update", "inner_lr", "inner_params", "outer_params", "utility_weight", "mixed_precision"}
    flat = load_params(ROOT / "params.yaml", overrides={"immunize.inner_params": "cross_attn"})
    assert for_threat(flat, "relearn").immunize.inner_params == for_threat(flat, "personalize").immunize.inner_params == "cross_attn"
    with pytest.raises(ParamsError, match=r"immunize.inner_params: 'all' is not one of"):
        load_params(ROOT / "params.yaml", overrides={"immunize.inner_params": {"relearn": "all", "personalize": "kv"}})
    with pytest.raises(ParamsError, match=r"immunize.outer_params: a mapping names every threat"):
        load_params(ROOT / "params.yaml", overrides={"immunize.outer_params": {"relearn": "unet"}})
    with pytest.raises(ParamsError, match=r"immunize.inner_update: 'adamw' is not one of"):
        load_params(ROOT / "params.yaml", overrides={"immunize.inner_update": {"relearn": "sgd", "personalize": "adamw"}})
    with pytest.raises(ParamsError, match=r"immunize.mixed_precision: 'fp16' is not one of fp32, bf16"):
        load_params(ROOT / "params.yaml", overrides={"immunize.mixed_precision": {"relearn": "fp16", "personalize": "fp32"}})
    with pytest.raises(ParamsError, match=r"immunize.merge_rows: 'padding' is not one of sequence, prompt"):
        load_params(ROOT / "params.yaml", overrides={"immunize.merge_rows": "padding"})
    with pytest.raises(ParamsError, match=r"immunize.utility_weight.relearn' must be a number"):
        load_params(ROOT / "params.yaml", overrides={"immunize.utility_weight": {"relearn": "x", "personalize": 1.0}})
    with pytest.raises(TypeError, match=r"immunize.inner_update, immunize.inner_lr, immunize.inner_params, immunize.outer_params, immunize.utility_weight, immunize.mixed_precision differ per threat"):
        immunize.immunize("mima", None, [object()], None, None, p.immunize, None, 0)


def test_attacker_sets_with_word_embeddings_and_lora_rank_are_checked():
    for which in ("lora", "kv+token", "unet+token", "token"):
        assert load_params(ROOT / "params.yaml", overrides={"immunize.inner_params": which}).immunize.inner_params == which
    with pytest.raises(ParamsError, match=r"immunize.inner_params: 'token\+kv' is not one of"):
        load_params(ROOT / "params.yaml", overrides={"immunize.inner_params": "token+kv"})
    with pytest.raises(ParamsError, match=r"immunize.inner_lora_rank: 0 must be >= 1"):
        load_params(ROOT / "params.yaml", overrides={"immunize.inner_lora_rank": 0})
