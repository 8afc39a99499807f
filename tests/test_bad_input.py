"""Bad input (DESIGN section 8): every case gets a clear error naming the file or key and what to
do, before any heavy work, and leaves no partial output behind."""

import json
import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mci_lib import artifacts, attacks, data, immunize, models
from mci_lib.config import ParamsError, load_params

from conftest import ROOT


def leftovers(folder: Path) -> list[str]:
    """Temporary files or folders of an interrupted atomic write."""
    return [str(p) for p in folder.rglob("*") if ".tmp-" in p.name]


def concept_folder(folder: Path, n: int = 2) -> Path:
    folder.mkdir(parents=True)
    rows = ["file_name,prompt"]
    for i in range(n):
        Image.fromarray(np.full((20, 20, 3), 40 * i, np.uint8)).save(folder / f"img {i}.png")
        rows.append(f"img {i}.png,a thing")
    (folder / "metadata.csv").write_text("\n".join(rows) + "\n")
    return folder


def concept_list(path: Path, entries) -> Path:
    path.write_text(json.dumps(entries))
    return path


def entry(folder, **extra):
    return {"instance_prompt": "a thing", "class_prompt": "a class", "instance_data_dir": str(folder), "class_data_dir": "class", **extra}


# concept lists ------------------------------------------------------------------------------


def test_concept_list_schema(tmp_path):
    path = concept_list(tmp_path / "c.json", [{"instance_prompt": "x", "class_prompt": "y"}])
    with pytest.raises(ValueError, match=r"c\.json: entry 0 lacks instance_data_dir"):
        data.read_concept_list(path, 32)
    assert leftovers(tmp_path) == []


def test_concept_list_duplicate_ids(tmp_path):
    folder = concept_folder(tmp_path / "a")
    path = concept_list(tmp_path / "c.json", [entry(folder), entry(folder)])
    with pytest.raises(ValueError, match=r"c\.json: entry 1 repeats instance_data_dir"):
        data.read_concept_list(path, 32)


def test_concept_list_zero_concepts(tmp_path):
    path = concept_list(tmp_path / "c.json", [])
    with pytest.raises(ValueError, match=r"c\.json: must be a non-empty JSON list"):
        data.read_concept_list(path, 32)


def test_unknown_concept(micro_world, micro_params):
    records = data.read_index(micro_world)
    with pytest.raises(ValueError, match=r"attack target 'dragon' has no 'attack' images in .*known subjects"):
        attacks.toy_attack_data(micro_world, records, micro_params.world, ["dragon"])


# image folders ------------------------------------------------------------------------------


def test_missing_image_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere: concept folder not found"):
        data.read_concept_folder(tmp_path / "nowhere", 32)


def test_empty_image_folder(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "metadata.csv").write_text("file_name,prompt\n")
    with pytest.raises(ValueError, match=r"empty: no images in this concept folder"):
        data.read_concept_folder(folder, 32)


def test_corrupt_image(tmp_path):
    folder = concept_folder(tmp_path / "c")
    (folder / "img 1.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match=r"img 1\.png: cannot read this image.*Replace or remove"):
        data.read_concept_folder(folder, 32)


def test_truncated_image(tmp_path):
    folder = concept_folder(tmp_path / "c")
    raw = (folder / "img 0.png").read_bytes()
    (folder / "img 0.png").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"img 0\.png: cannot read this image"):
        data.read_concept_folder(folder, 32)


def test_metadata_row_names_a_missing_file(tmp_path):
    folder = concept_folder(tmp_path / "c")
    (folder / "img 1.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"metadata\.csv: row names 'img 1\.png'.*Add the file or remove the row"):
        data.read_concept_folder(folder, 32)


def test_grayscale_and_rgba_images_are_converted(tmp_path):
    folder = concept_folder(tmp_path / "c")
    Image.fromarray(np.full((24, 24), 200, np.uint8), "L").save(folder / "img 0.png")
    Image.fromarray(np.zeros((24, 24, 4), np.uint8), "RGBA").save(folder / "img 1.png")  # fully transparent: white
    c = data.read_concept_folder(folder, 16)
    assert c.images.shape == (2, 3, 16, 16)
    assert int(c.images[0].min()) == 200 and int(c.images[1].min()) == 255


# params -------------------------------------------------------------------------------------


def test_params_unknown_key():
    with pytest.raises(ParamsError, match=r"immunize\.outer_lrr"):
        load_params(ROOT / "params.yaml", overrides={"immunize.outer_lrr": 1e-3})


def test_params_wrong_type():
    with pytest.raises(ParamsError, match=r"immunize\.steps' must be an integer, got 'many' \(or a mapping of threats"):
        load_params(ROOT / "params.yaml", overrides={"immunize.steps": "many"})


def test_params_out_of_range():
    with pytest.raises(ParamsError, match=r"immunize\.steps.*must be >= 1"):
        load_params(ROOT / "params.yaml", overrides={"immunize.steps": 0})
    with pytest.raises(ParamsError, match=r"attack\.checkpoints \[500\] fall outside"):
        load_params(ROOT / "params.yaml", overrides={"attack.checkpoints": [500]})


# model folders, deltas and checkpoints --------------------------------------------------------


def test_model_folder_missing_component(micro_pipe, tmp_path):
    folder = models.save_pipeline(micro_pipe, tmp_path / "model")
    for path in sorted((folder / "unet").iterdir()):
        path.unlink()
    (folder / "unet").rmdir()
    with pytest.raises(FileNotFoundError, match=r"model: the pipeline component folder 'unet/' is missing"):
        models.load_pipeline(folder)


def test_delta_for_another_architecture(micro_pipe):
    name, p = next((n, p) for n, p in micro_pipe.unet.named_parameters() if "attn2.to_k" in n)
    before = p.detach().clone()
    with pytest.raises(ValueError, match="has shape .* the UNet's is"):
        immunize.apply_delta(micro_pipe.unet, {name: torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="is not a parameter of this UNet"):
        immunize.apply_delta(micro_pipe.unet, {"down_blocks.9.attn2.to_k.weight": torch.zeros(3, 3)})
    assert torch.equal(p.detach(), before)


class _Tripwire:
    """A pickle that, if it were ever loaded, would leave a file behind."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_checkpoint_that_is_a_pickle_is_refused_unloaded(tmp_path):
    wire = tmp_path / "pickle_was_loaded"
    path = tmp_path / "weights.safetensors"
    path.write_bytes(pickle.dumps({"w": _Tripwire(wire)}))
    with pytest.raises(ValueError, match=r"weights\.safetensors: not a safetensors file.*pickles never are"):
        artifacts.load_weights(path)
    assert not wire.exists()


def test_checkpoint_with_wrong_tensors(tmp_path):
    w = {"a": torch.zeros(2, requires_grad=True)}
    opt = torch.optim.AdamW(list(w.values()))
    artifacts.save_training_state(tmp_path / "ckpt", 1, w, opt, {"g": torch.Generator()})
    other = {"b": torch.zeros(2, requires_grad=True)}
    with pytest.raises(ValueError, match=r"state\.safetensors: checkpoint tensors do not match this run.*delete the checkpoint folder"):
        artifacts.load_training_state(tmp_path / "ckpt", other, torch.optim.AdamW(list(other.values())), {"g": torch.Generator()})
    shaped = {"a": torch.zeros(3, requires_grad=True)}
    with pytest.raises(ValueError, match=r"tensor 'a' has shape \(2,\), this run's is \(3,\)"):
        artifacts.load_training_state(tmp_path / "ckpt", shaped, torch.optim.AdamW(list(shaped.values())), {"g": torch.Generator()})


# prompts, divergence, unwritable output ---------------------------------------------------------


def test_prompt_longer_than_the_tokenizer_limit_warns(micro_pipe):
    with pytest.warns(UserWarning, match="exceed the tokenizer's 77 tokens and are truncated"):
        states = models.encode_prompts(micro_pipe, ["a photo of " + "a red star and " * 30])
    assert states.shape[1] == 77


def test_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    from resume_worker import build

    unet, concepts, prior, abar, ctx, cfg = build()
    cfg = replace(cfg, outer_lr=1e30, steps=6)  # the first step throws the weights to ~1e30: the next loss is not finite
    with pytest.raises(FloatingPointError, match=r"outer loss is (nan|inf).*last good checkpoint is in .*ckpt.*Lower immunize\.outer_lr"):
        with immunize.double_backward_attention():
            immunize.run_mima(unet, concepts, prior, abar, cfg, ctx, seed=0, progress=False, checkpoint_dir=tmp_path / "ckpt")
    state = json.loads((tmp_path / "ckpt" / "state.json").read_text())
    assert 1 <= state["step"] < 6
    assert leftovers(tmp_path) == []


def test_output_folder_that_cannot_be_written(micro_pipe, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(PermissionError, match=r"cannot create the output folder .*a_file.*Choose a writable output path"):
        models.save_pipeline(micro_pipe, blocker / "model")
    with pytest.raises(PermissionError, match="Choose a writable output path"):
        artifacts.write_json(blocker / "sub" / "m.json", {"x": 1})
    assert blocker.read_text() == "not a folder" and leftovers(tmp_path) == []
