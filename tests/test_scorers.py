"""Feature scorers of the Stable Diffusion profile, on tiny randomly initialised CLIP and DINO models
saved to local folders (nothing is downloaded)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from mci_lib import scorers
from mci_lib.config import EvalModelsConfig


def _images(n: int, size: int = 48, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=100, max_position_embeddings=16),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8),
        projection_dim=12,
    )
    folder = tmp_path_factory.mktemp("clip") / "clip"
    CLIPModel(cfg).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def dinov2_folder(tmp_path_factory):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(1)
    cfg = Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2, image_size=32, patch_size=8)
    folder = tmp_path_factory.mktemp("dino") / "dinov2"
    Dinov2Model(cfg).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def vit_dino_folder(tmp_path_factory):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(2)
    cfg = ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=32, patch_size=8)
    folder = tmp_path_factory.mktemp("vit") / "dino-vit"
    ViTModel(cfg).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def lpips_file(tmp_path_factory):
    """Random weights under the key names of the lpips package's LPIPS(net='alex') state dict."""
    g = torch.Generator().manual_seed(3)
    state = {}
    for k, (name, i, o, ks, _, _) in enumerate(scorers._ALEX):
        state[f"net.{name}.weight"] = torch.randn(o, i, ks, ks, generator=g) * (2.0 / (i * ks * ks)) ** 0.5
        state[f"net.{name}.bias"] = torch.zeros(o)
        state[f"lin{k}.model.1.weight"] = torch.rand(1, o, 1, 1, generator=g)
    path = tmp_path_factory.mktemp("lpips") / "lpips_alex.safetensors"
    save_file(state, str(path))
    return path


def test_clip_embeddings_and_similarity(clip_folder):
    enc = scorers.load_clip(clip_folder)
    images = _images(5)
    emb = enc.embed(images, batch_size=2)
    assert emb.shape == (5, 12) and emb.dtype == torch.float32
    assert torch.equal(emb, enc.embed(images, batch_size=2))  # deterministic
    assert torch.allclose(emb, enc.embed(images, batch_size=5), atol=1e-5)  # batch-independent
    same = scorers.clip_similarity(images[:1], images[:1], enc)
    assert same == pytest.approx(1.0, abs=1e-5)
    other = scorers.clip_similarity(images, _images(4, seed=1), enc)
    assert -1.0 <= other <= 1.0
    # [0, 1] floats and uint8 give the same embedding
    assert torch.allclose(enc.embed(images.float() / 255), emb, atol=1e-5)


def test_clip_vision_only_folder_loads_the_same_embeddings(clip_folder, tmp_path):
    full = scorers.load_clip(clip_folder)
    full.model.save_pretrained(str(tmp_path / "v"))  # a CLIPVisionModelWithProjection folder
    assert json.loads((tmp_path / "v" / "config.json").read_text())["model_type"] == "clip_vision_model"
    vision = scorers.load_clip(tmp_path / "v")
    images = _images(3)
    assert torch.allclose(full.embed(images), vision.embed(images), atol=1e-6)


@pytest.mark.parametrize("which", ["dinov2_folder", "vit_dino_folder"])
def test_dino_embeddings_and_similarity(which, request):
    folder = request.getfixturevalue(which)
    enc = scorers.load_dino(folder)
    images = _images(4, size=40)
    emb = enc.embed(images)
    assert emb.shape == (4, 16)
    assert torch.equal(emb, scorers.load_dino(folder).embed(images))  # deterministic across loads
    assert scorers.dino_similarity(images, images[[0, 0, 0, 0]][:1], enc) == pytest.approx(
        float(torch.nn.functional.cosine_similarity(emb, emb[:1]).mean()), abs=1e-5)
    s = scorers.dino_similarity(images, images, enc)
    assert -1.0 <= s <= 1.0
    assert scorers.dino_similarity(images[2:3], images[2:3], enc) == pytest.approx(1.0, abs=1e-5)


def test_preprocessor_config_sets_mean_std_and_sizes(clip_folder, tmp_path):
    import shutil

    folder = tmp_path / "clip"
    shutil.copytree(clip_folder, folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "size": {"shortest_edge": 40}, "crop_size": {"height": 32, "width": 32}, "do_center_crop": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25], "resample": 3,
    }))
    enc = scorers.load_clip(folder)
    assert enc.preprocess.mean == (0.5, 0.5, 0.5) and enc.preprocess.resize == 40 and enc.preprocess.crop == 32
    x = enc.preprocess(torch.full((1, 3, 64, 80), 255, dtype=torch.uint8))
    assert x.shape == (1, 3, 32, 32) and torch.allclose(x, torch.full_like(x, 2.0))
    # the older feature-extractor form (a bare integer: shortest edge for CLIP), as openai/clip-vit-large-patch14 ships it
    (folder / "preprocessor_config.json").write_text(json.dumps({"size": 36, "crop_size": 32, "resample": 3}))
    old = scorers.load_clip(folder).preprocess
    assert (old.resize, old.shortest_edge, old.crop, old.mean) == (36, True, 32, scorers.CLIP_MEAN)
    assert old(torch.zeros(1, 3, 40, 60, dtype=torch.uint8)).shape == (1, 3, 32, 32)
    # without the file: the CLIP defaults at the model's own image size
    plain = scorers.load_clip(clip_folder).preprocess
    assert plain.mean == scorers.CLIP_MEAN and plain.crop == 32


def test_wrong_model_kind_and_incomplete_folder_are_refused(clip_folder, dinov2_folder, tmp_path):
    with pytest.raises(ValueError, match="eval_models.clip_dir.*not CLIP"):
        scorers.load_clip(dinov2_folder)
    with pytest.raises(ValueError, match="eval_models.dino_dir.*'clip'"):
        scorers.load_dino(clip_folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="eval_models.clip_dir: .*empty has no config.json"):
        scorers.load_clip(tmp_path / "empty")
    enc = scorers.load_clip(clip_folder)
    with pytest.raises(ValueError, match="got a clip encoder"):
        scorers.dino_similarity(_images(1), _images(1), enc)


def test_missing_paths_name_key_path_and_download(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError) as err:
        scorers.load_clip(missing)
    msg = str(err.value)
    assert msg.startswith(f"eval_models.clip_dir: {missing} not found")
    assert "openai/clip-vit-large-patch14" in msg and f"--local-dir {missing}" in msg and "network" in msg
    with pytest.raises(FileNotFoundError, match=r"eval_models.dino_dir: .*nope not found.*facebook/dino-vits16"):
        scorers.load_dino(missing)
    with pytest.raises(FileNotFoundError, match=r"eval_models.lpips_weights: .*x.safetensors not found.*lpips"):
        scorers.load_lpips(tmp_path / "x.safetensors")
    with pytest.raises(FileNotFoundError, match="eval_models.clip_dir is not set"):
        scorers.load_scorers(EvalModelsConfig())


def test_lpips_from_local_weights(lpips_file, tmp_path):
    model = scorers.load_lpips(lpips_file)
    a, b = _images(3, size=64), _images(3, size=64, seed=5)
    d = model(a, b)
    assert d.shape == (3,) and bool((d > 0).all())
    assert torch.allclose(model(a, a), torch.zeros(3), atol=1e-6)
    assert scorers.lpips_similarity(a[:1], a[:1], model) == pytest.approx(1.0, abs=1e-6)
    pairs = float(torch.stack([model(a[i : i + 1], b[j : j + 1]) for i in range(3) for j in range(3)]).mean())
    assert scorers.lpips_similarity(a, b, model, batch_size=2) == pytest.approx(1.0 - pairs, abs=1e-5)
    # the package's ModuleList names (lins.<k>) are accepted too; a file without them is refused
    from safetensors.torch import load_file

    state = load_file(str(lpips_file))
    renamed = {k.replace("lin", "lins.", 1) if k.startswith("lin") else k: v for k, v in state.items()}
    save_file(renamed, str(tmp_path / "b.safetensors"))
    assert torch.allclose(scorers.load_lpips(tmp_path / "b.safetensors")(a, b), d)
    save_file({k: v for k, v in state.items() if not k.startswith("lin")}, str(tmp_path / "c.safetensors"))
    with pytest.raises(ValueError, match="lin0.model.1.weight"):
        scorers.load_lpips(tmp_path / "c.safetensors")


def test_load_scorers_skips_lpips_without_weights(clip_folder, dinov2_folder, lpips_file, caplog):
    s = scorers.load_scorers(EvalModelsConfig(str(clip_folder), str(dinov2_folder), None))
    assert s.lpips is None and "LPIPS is skipped" in caplog.text
    images = _images(2, size=64)
    out = s.scores(images, images)
    assert set(out) == {"clip_sim", "dino_sim"}
    full = scorers.load_scorers(EvalModelsConfig(str(clip_folder), str(dinov2_folder), str(lpips_file))).scores(images, _images(2, size=64, seed=9))
    assert set(full) == {"clip_sim", "dino_sim", "lpips_sim"} and all(-1 <= v <= 1 for k, v in full.items() if k != "lpips_sim")
