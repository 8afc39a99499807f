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
