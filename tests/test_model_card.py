"""The model card of an immunized model and its release folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mci_lib import artifacts, models

ROOT = Path(__file__).resolve().parents[1]

# the structure of reports/metrics/attack_<threat>.json (mci_lib.metrics.attack_report)
METRICS = {
    "attack_is_real": {"full": False, "lora": True},
    "msgr": {"full": {"mima": -70.9478, "imma_joint": -79.02}, "lora": {"mima": 15.2238, "imma_joint": 43.47}},
    "msgr_std": {"full": {"mima": 25.7605, "imma_joint": 11.87}, "lora": {"mima": 11.6079, "imma_joint": 7.32}},
    "verdict": {"full": {"mima": "faster", "imma_joint": "faster"}, "lora": {"mima": "slower", "imma_joint": "slower"}},
    "worst_case_msgr": {"full": {"mima": -70.9478, "imma_joint": -79.02}, "lora": {"mima": 10.7669, "imma_joint": 35.61}},
    "steps_to_relearn_ratio": {"full": {"mima": 0.5833, "imma_joint": 0.58}, "lora": {"mima": 1.25, "imma_joint": 1.5}},
    "no_immunization_final_presence": {"full": 0.640625, "lora": 0.9375},
    "utility_presence": {"mima": 0.8984375, "imma_joint": 0.789, "none": 1.0},
    "utility_frechet": {"mima": 28.593, "imma_joint": 24.14, "none": 0.0},
}
SETTINGS = {"mode": "second_order", "steps": 60, "inner_lr": 0.01, "outer_lr": 0.001, "methods": ["mima", "imma_joint"], "merge": "hard"}


def _card(**kw) -> str:
    args = dict(method="mima", threat="relearn", targets=["star", "heart"], base_model="models/erased",
                immunize_settings=SETTINGS, attack_metrics=METRICS)
    args.update(kw)
    return artifacts.model_card(**args)


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    head, _, _ = card[4:].partition("\n---\n")
    return yaml.safe_load(head)


def test_front_matter_parses_with_the_hub_keys():
    meta = _front_matter(_card(license="mit", tags=("toy-world",)))
    assert meta["library_name"] == "diffusers" and meta["pipeline_tag"] == "text-to-image"
    assert meta["base_model"] == "models/erased" and meta["license"] == "mit"
    assert {"immunization", "mima", "stable-diffusion", "relearn", "toy-world"} <= set(meta["tags"])


def test_tables_carry_the_numbers_given():
    card = _card()
    rows = {line.split("|")[1].strip(): line for line in card.splitlines() if line.startswith("| ")}
    assert "15.22 +- 11.61" in rows["lora"] and "slower" in rows["lora"] and "10.77" in rows["lora"] and "1.25" in rows["lora"]
    assert "-70.95 +- 25.76" in rows["full"] and "faster" in rows["full"]
    assert "0.898" in rows["utility presence"] and "1.000" in rows["utility presence"]
    assert "28.59" in rows["utility Frechet distance"] and "0.00" in rows["utility Frechet distance"]
    assert "star" in rows and "heart" in rows
    assert "second_order" in rows["`mode`"] and "0.001" in rows["`outer_lr`"] and "mima, imma_joint" in rows["`methods`"]
    # another method reads its own column of the same metrics
    assert "43.47 +- 7.32" in _card(method="imma_joint")


def test_a_non_real_attack_is_flagged_beside_its_msgr():
    rows = {line.split("|")[1].strip(): line for line in _card().splitlines() if line.startswith("| ")}
    assert "(attack not real)" in rows["full"] and "NO: not a real attack" in rows["full"] and "0.64" in rows["full"]
    assert "not real" not in rows["lora"] and rows["lora"].rstrip().endswith("| yes |")


def test_reproduce_section_names_the_commands():
    card = _card(profile="sd15", threat="personalize", targets=["p1"])
    assert "dvc exp run -S profile=sd15" in card and "dvc repro immunize@personalize attack_personalize" in card
    assert "papermill notebooks/02_immunize.ipynb" in card and "notebooks/04_personalization_attack.ipynb" in card
    assert "dvc repro" in _card()


def test_the_committed_metrics_file_makes_a_card():
    path = ROOT / "reports" / "metrics" / "attack_relearn.json"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    metrics = json.loads(path.read_text())
    card = _card(attack_metrics=metrics)
    assert f"{metrics['msgr']['lora']['mima']:.2f}" in card


def test_bad_metrics_are_refused():
    with pytest.raises(ValueError, match="attack_relearn.json"):
        _card(attack_metrics={"foo": 1})
    with pytest.raises(ValueError, match="no target"):
        _card(targets=[])


def test_export_release_copies_a_loadable_folder(tmp_path, micro_pipe):
    src = models.save_pipeline(micro_pipe, tmp_path / "immunized")
    artifacts.save_weights(src / "delta.safetensors", {"w": micro_pipe.unet.conv_in.weight})
    artifacts.write_json(src / "manifest.json", {"seeds": {"immunize": 0}})
    (src / "log.csv").write_text("step,loss\n0,1.0\n")
    card = _card()
    out = artifacts.export_release(src, tmp_path / "release", card)
    names = {p.name for p in out.iterdir()}
    assert {"model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler", "delta.safetensors", "manifest.json", "README.md"} == names
    assert (out / "README.md").read_text() == card
    assert not list(tmp_path.glob(".release.tmp-*"))
    pipe = models.load_pipeline(out)
    a, b = micro_pipe.unet.state_dict(), pipe.unet.state_dict()
    assert all((a[k] == b[k]).all() for k in a)
    # a second export replaces the first as a whole
    artifacts.export_release(src, out, card.replace("# ", "# v2 ", 1))
    assert "# v2 " in (out / "README.md").read_text()


def test_export_release_refuses_pickles_and_bad_input(tmp_path, micro_pipe):
    src = models.save_pipeline(micro_pipe, tmp_path / "m")
    with pytest.raises(ValueError, match="front matter"):
        artifacts.export_release(src, tmp_path / "r", "no card")
    (src / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="pickled weights"):
        artifacts.export_release(src, tmp_path / "r", _card())
    assert not (tmp_path / "r").exists()
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        artifacts.export_release(tmp_path / "nothing", tmp_path / "r", _card())
