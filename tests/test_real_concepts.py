"""Real concept images as subjects of the world (the real-image profile, profiles/wikiart.yaml)."""

import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import MICRO, ROOT
from mci_lib import attacks, data, erase, immunize, models
from mci_lib.config import ParamsError, check_paths, load_params


def _flat_concept(folder: Path, name: str, colors: list[tuple[int, int, int]], prompt: str) -> Path:
    """A concept folder whose image j is a flat color: every view of it keeps that color, so a
    record's source image can be read back from its pixels."""
    out = folder / name
    out.mkdir(parents=True)
    rows = []
    for j, rgb in enumerate(colors):
        Image.new("RGB", (40 + j, 30), rgb).save(out / f"img ({j})!.png")
        rows.append({"file_name": f"img ({j})!.png", "prompt": prompt})
    with open(out / "metadata.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["file_name", "prompt"])
        w.writeheader()
        w.writerows(rows)
    return out


@pytest.fixture()
def flat_world(tmp_path, micro_params):
    colors = [(20 * j, 255 - 20 * j, 7 * j) for j in range(8)]
    _flat_concept(tmp_path / "concepts", "Flat_Painter", colors, "An artwork by Flat Painter.")
    world = replace(micro_params.world, real=("Flat_Painter",), real_holdout=3, judge_test_per_subject=12, reference_per_subject=12, pretrain_per_shape=30)
    real = data.read_real_concepts(tmp_path / "concepts", world.real, 2 * world.image_size)
    return world, real, colors


def test_real_concept_splits_keep_held_out_images_apart(flat_world):
    world, real, colors = flat_world
    records = list(data.generate_records(world, 0, real))
    mine = [(r, im) for r, im in records if r.subject == "Flat_Painter"]
    assert {r.caption for r, _ in mine} == {"An artwork by Flat Painter."}
    assert all(r.color == "" and r.style == "" for r, _ in mine)
    palette = np.array(colors, dtype=float)

    def source(im):  # the flat color a view came from
        return int(np.argmin(((palette - im.reshape(-1, 3).mean(0)) ** 2).sum(1)))

    held = {source(im) for r, im in mine if r.split in data.REAL_HOLDOUT_SPLITS}
    trained = {source(im) for r, im in mine if r.split not in data.REAL_HOLDOUT_SPLITS}
    assert len(held) == world.real_holdout and not held & trained
    assert held | trained == set(range(len(colors)))
    counts = {s: sum(r.split == s for r, _ in mine) for s in data.SPLITS}
    assert counts["pretrain"] == world.pretrain_per_shape and counts["judge_test"] == world.judge_test_per_subject
    assert all(im.shape == (world.image_size, world.image_size, 3) for _, im in mine)
    # deterministic for a seed, and the shapes' images do not move when a real concept joins
    again = list(data.generate_records(world, 0, real))
    assert all(a[0] == b[0] and np.array_equal(a[1], b[1]) for a, b in zip(records, again))
    toy_only = list(data.generate_records(replace(world, real=()), 0))
    assert all(a[0] == b[0] and np.array_equal(a[1], b[1]) for a, b in zip(toy_only, records))


def test_real_concepts_in_captions_prompts_and_erasure(flat_world, tmp_path):
    world, real, _ = flat_world
    out = data.write_toy_world(world, 0, tmp_path / "toy", progress=False, real=real)
    records = data.read_index(out)
    assert json.loads((out / "world.json").read_text())["real"]["Flat_Painter"]["images"] == 8
    assert data.real_prompts(records, "Flat_Painter") == ["An artwork by Flat Painter."]
    rec = data.select(records, "pretrain", "Flat_Painter")[0]
    assert data.fresh_caption(np.random.default_rng(0), rec) == "An artwork by Flat Painter."
    assert attacks.concept_prompts("Flat_Painter", world.colors, 3, ["p a", "p b"]) == ["p a", "p b", "p a"]
    ad = attacks.toy_attack_data(out, records, world, ["Flat_Painter"])[0]
    assert set(ad.captions) == {"An artwork by Flat Painter."} and ad.token is None
    prompts = erase.shape_erase_prompts(["Flat_Painter", "star"], ["circle"], ["red"], "circle", {"Flat_Painter": ["An artwork by Flat Painter."]})
    assert prompts.erase[0] == "An artwork by Flat Painter." and prompts.guide[0] == "An artwork by circle."
    assert prompts.erase_words[0] == "Flat Painter" and prompts.erase[1] == "a photo of a red star"


def test_utility_uncond_empties_a_share_of_the_prior_captions(flat_world, tmp_path, micro_pipe):
    """``immunize.utility_uncond`` puts the empty caption's text states into that share of the
    prior; a zero share leaves the prior exactly as without the knob."""
    world, real, _ = flat_world
    out = data.write_toy_world(world, 0, tmp_path / "toy", progress=False, real=real)
    records = data.read_index(out)
    s = world.image_size // 4

    def latents(images):
        return torch.zeros(images.shape[0], 4, s, s)

    def prior(share):
        return immunize.toy_threat_concepts(micro_pipe, out, records, world, ["Flat_Painter"], latents, prior_size=40, seed=0, utility_uncond=share)[1]

    plain, none, quarter = immunize.toy_threat_concepts(micro_pipe, out, records, world, ["Flat_Painter"], latents, 40, 0)[1], prior(0.0), prior(0.25)
    assert torch.equal(plain.text, none.text)
    empty = models.encode_prompts(micro_pipe, [""])[0]
    is_empty = [torch.equal(row, empty) for row in quarter.text]
    assert sum(is_empty) == 10 and not any(torch.equal(row, empty) for row in plain.text)
    # the other captions are the ones drawn without the knob
    kept = [i for i, e in enumerate(is_empty) if not e]
    assert all(torch.equal(quarter.text[i], plain.text[i]) for i in kept)
    with pytest.raises(ParamsError, match="immunize.utility_uncond"):
        load_params(ROOT / "params.yaml", None, {"immunize.utility_uncond": 1.0})


def test_reads_wikiart_as_real_concepts(wikiart):
    concepts = data.read_real_concepts(wikiart, ["Van_Gogh", "Claude_Monet"], 64)
    assert [c.name for c in concepts] == ["Van_Gogh", "Claude_Monet"]
    assert all(c.images.shape == (20, 3, 64, 64) for c in concepts)
    assert set(concepts[0].prompts) == {"An artwork by Van Gogh."}


def test_real_concept_errors_name_the_problem(tmp_path, wikiart):
    with pytest.raises(FileNotFoundError, match="Picasso"):
        data.read_real_concepts(wikiart, ["Picasso"], 32)
    _flat_concept(tmp_path / "c", "Someone_Else", [(1, 2, 3), (4, 5, 6)], "An artwork by Van Gogh.")
    with pytest.raises(ValueError, match="Someone Else"):
        data.read_real_concepts(tmp_path / "c", ["Someone_Else"], 32)
    with pytest.raises(ValueError, match="repeats a name"):
        data._check_world(replace(load_params(ROOT / "params.yaml").world, real=("star",)))
    p = load_params(ROOT / "params.yaml", "wikiart", {"paths.real_concepts": str(tmp_path / "nowhere")})
    with pytest.raises(FileNotFoundError, match="paths.real_concepts"):
        check_paths(p)


@pytest.mark.slow
def test_real_image_profile_runs_end_to_end_with_micro_parameters(tmp_path, clip_vocab, wikiart):
    """The wikiart profile's re-learning chain (data prep, erase, immunize, attack) on the real
    paintings, at micro sizes."""
    import papermill as pm

    overrides = {**MICRO, "paths.real_concepts": str(wikiart), "paths.data_dir": str(tmp_path / "data" / "toy"),
                 "paths.models_dir": str(tmp_path / "models"), "paths.reports_dir": str(tmp_path / "reports"), "paths.clip_vocab": str(clip_vocab),
                 "immunize.methods": ["mima"], "attack.relearn": ["lora"], "attack.sweep_attacks": []}
    for name, extra in (("01_data_prep.ipynb", {}), ("02a_erase.ipynb", {}), ("02_immunize.ipynb", {"threat": "relearn"}), ("03_relearning_attack.ipynb", {})):
        pm.execute_notebook(str(ROOT / "notebooks" / name), str(tmp_path / name), cwd=str(ROOT), kernel_name="python3", progress_bar=False,
                            parameters={"params_file": str(ROOT / "params.yaml"), "profile": "wikiart", "overrides": overrides, "progress": False, **extra})
    reports = tmp_path / "reports" / "metrics"
    prep = json.loads((reports / "data_prep.json").read_text())
    assert set(prep["base_real_presence"]) == {"Van_Gogh", "Claude_Monet"}
    assert set(prep["judge_real_test_accuracy"]) == {"Van_Gogh", "Claude_Monet"}
    assert set(json.loads((reports / "erase.json").read_text())["erased_presence"]) == {"Van_Gogh", "Claude_Monet"}
    attack = json.loads((reports / "attack_relearn.json").read_text())
    assert set(attack["msgr"]) == {"lora"} and set(attack["msgr"]["lora"]) == {"mima"}
    index = data.read_index(tmp_path / "data" / "toy")
    assert {r.subject for r in index} >= {"Van_Gogh", "Claude_Monet", "circle"}
