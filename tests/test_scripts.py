"""The helper scripts behind `make full`: a profile overlay turned into `dvc exp run -S` flags
resolves to the same parameters as selecting the profile, and a run is published whole."""

import json
import shlex
import sys

import pytest
import yaml

from conftest import ROOT
from mci_lib.config import load_params, params_to_dict

sys.path.insert(0, str(ROOT / "scripts"))
import overlay_flags  # noqa: E402
from publish_run import publish  # noqa: E402


@pytest.mark.parametrize("profile", sorted(p.stem for p in (ROOT / "profiles").glob("*.yaml") if p.stem != "tiny"))
def test_overlay_flags_resolve_to_the_profile(profile):
    words = shlex.split(overlay_flags.main(ROOT / "profiles" / f"{profile}.yaml"))
    assert words[::2] == ["-S"] * (len(words) // 2)
    # DVC parses each value as YAML and writes it into params.yaml; load_params does the same
    overrides = {key: yaml.safe_load(value) for key, value in (w.split("=", 1) for w in words[1::2])}
    as_flags = params_to_dict(load_params(ROOT / "params.yaml", overrides=overrides))
    as_profile = params_to_dict(load_params(ROOT / "params.yaml", profile=profile))
    assert as_flags.pop("profile") == "tiny" and as_profile.pop("profile") == profile
    assert as_flags == as_profile


def test_overlay_flags_refuse_a_file_that_is_not_an_overlay(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(SystemExit, match="bad.yaml"):
        overlay_flags.main(bad)
    bad.write_text("profile: quick\n")
    with pytest.raises(SystemExit, match="cannot select another profile"):
        overlay_flags.main(bad)


T0, T1 = "2026-12-02T01:00:00.000000+00:00", "2026-12-02T01:00:12.345000+00:00"


def _run_folder(root):
    for folder in ("reports/tables", "reports/metrics", "reports/figures/results", "reports/notebooks"):
        (root / folder).mkdir(parents=True)
    (root / "reports/tables/msgr.md").write_text("| a |\n")
    (root / "reports/metrics/attack_relearn.json").write_text('{"msgr": {}}')
    (root / "reports/figures/results/curve.png").write_bytes(b"\x89PNG")
    meta = {"papermill": {"start_time": T0, "end_time": T1, "duration": 12.345}}
    (root / "reports/notebooks/03_relearning_attack.ipynb").write_text(json.dumps({"metadata": meta, "cells": []}))
    (root / "params.yaml").write_text("attack:\n  seeds: [0, 1]\n")


def test_publish_copies_the_run_and_records_its_stages(tmp_path):
    _run_folder(tmp_path)
    target = publish(tmp_path, "full")
    assert target == tmp_path / "reports/published/full"
    assert (target / "tables/msgr.md").read_text() == "| a |\n"
    assert (target / "metrics/attack_relearn.json").is_file() and (target / "figures/curve.png").is_file()
    run = json.loads((target / "run.json").read_text())
    assert run["params"] == {"attack": {"seeds": [0, 1]}}
    assert run["stages"] == {"03_relearning_attack": {"start": T0, "end": T1, "seconds": 12.3}}
    assert run["span"]["seconds"] == 12.3 and run["profile"] is None
    # a second publish replaces the first whole, leaving no temporary folder
    (tmp_path / "reports/tables/msgr.md").write_text("| b |\n")
    publish(tmp_path, "full")
    assert (target / "tables/msgr.md").read_text() == "| b |\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["full"]


def test_publish_refuses_a_run_that_has_not_happened(tmp_path):
    _run_folder(tmp_path)
    (tmp_path / "reports/figures/results/curve.png").unlink()
    with pytest.raises(SystemExit, match="figures/results"):
        publish(tmp_path, "full")
    assert not (tmp_path / "reports/published/full").exists()


DVC_YAML = """
stages:
  erase:
    cmd: run erase
    outs:
      - models/erased
      - reports/figures/erase
      - reports/notebooks/02a_erase.ipynb:
          cache: false
    metrics:
      - reports/metrics/erase.json:
          cache: false
  immunize:
    foreach: [relearn, personalize]
    do:
      cmd: run ${item}
      outs:
        - reports/figures/immunize/${item}_utility_samples.png
        - reports/notebooks/02_immunize_${item}.ipynb:
            cache: false
      metrics:
        - reports/metrics/immunize_${item}.json:
            cache: false
      plots:
        - reports/plots/immunize_${item}_mima.csv:
            x: step
"""


def test_publish_stages_takes_only_what_those_stages_declare(tmp_path):
    _run_folder(tmp_path)  # reports/ also holds another run's tables, metrics and figures
    (tmp_path / "dvc.yaml").write_text(DVC_YAML)
    (tmp_path / "params.yaml").write_text("profile: wikiart\nseed: 0\n")
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles/wikiart.yaml").write_text("pretrain:\n  unet_steps: 1400\n")
    for folder in ("models/erased", "reports/figures/erase", "reports/figures/immunize", "reports/plots"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "reports/figures/erase/base_vs_erased.png").write_bytes(b"\x89PNG")
    (tmp_path / "reports/figures/immunize/relearn_utility_samples.png").write_bytes(b"\x89PNG")
    (tmp_path / "reports/figures/immunize/personalize_utility_samples.png").write_bytes(b"\x89PNG")
    (tmp_path / "reports/metrics/erase.json").write_text("{}")
    (tmp_path / "reports/metrics/immunize_relearn.json").write_text("{}")
    (tmp_path / "reports/plots/immunize_relearn_mima.csv").write_text("step\n0\n")
    meta = {"papermill": {"start_time": T1, "end_time": "2026-12-02T01:01:00.000000+00:00", "duration": 47.6}}
    (tmp_path / "reports/notebooks/02_immunize_relearn.ipynb").write_text(json.dumps({"metadata": meta, "cells": []}))
    (tmp_path / "reports/notebooks/02a_erase.ipynb").write_text(json.dumps({"metadata": {"papermill": {"start_time": T0, "end_time": T1, "duration": 12.3}}, "cells": []}))
    target = publish(tmp_path, "wikiart", ["erase", "immunize@relearn"])
    listing = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
    # the personalization item, the other run's attack metrics, tables and figures are left out
    assert listing == ["figures/erase_base_vs_erased.png", "figures/immunize_relearn_utility_samples.png", "metrics/erase.json",
                       "metrics/immunize_relearn.json", "plots/immunize_relearn_mima.csv", "run.json"]
    run = json.loads((target / "run.json").read_text())
    assert run["stages_published"] == ["erase", "immunize@relearn"]
    assert set(run["stages"]) == {"02a_erase", "02_immunize_relearn"}  # not 03_relearning_attack
    assert run["span"]["seconds"] == 60.0
    assert run["profile"] == {"pretrain": {"unet_steps": 1400}} and run["params"]["profile"] == "wikiart"


def test_publish_stages_refuses_an_unknown_stage_or_a_missing_output(tmp_path):
    _run_folder(tmp_path)
    (tmp_path / "dvc.yaml").write_text(DVC_YAML)
    with pytest.raises(SystemExit, match="immunize@relearn"):
        publish(tmp_path, "x", ["immunize"])
    with pytest.raises(SystemExit, match="no stage 'attack'"):
        publish(tmp_path, "x", ["attack"])
    with pytest.raises(SystemExit, match="models/erased"):
        publish(tmp_path, "x", ["erase"])
    assert not (tmp_path / "reports/published").exists()


def test_publish_of_an_attack_stage_run_under_another_profile_builds_its_msgr_table(tmp_path):
    _run_folder(tmp_path)
    (tmp_path / "dvc.yaml").write_text("stages:\n  attack_personalize:\n    cmd: run\n    metrics:\n      - reports/metrics/attack_personalize.json:\n          cache: false\n")
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles/full.yaml").write_text("attack:\n  batch_size: 8\n")
    report = {"msgr": {"dreambooth": {"mima": 12.34}}, "msgr_std": {"dreambooth": {"mima": 5.0}}, "verdict": {"dreambooth": {"mima": "slower"}},
              "msgr_sim": {"dreambooth": {"mima": 3.21}}, "worst_case_msgr": {"dreambooth": {"mima": -7.77}},
              "steps_to_relearn_ratio": {"dreambooth": {"mima": 1.25}}, "attack_is_real": {"dreambooth": True},
              "utility_presence": {"mima": 0.8776}}
    (tmp_path / "reports/metrics/attack_personalize.json").write_text(json.dumps(report))
    target = publish(tmp_path, "full_x", ["attack_personalize"], profile="full")
    table = (target / "tables/msgr.md").read_text().splitlines()
    assert table[0].startswith("| threat | attack | method | msgr |")
    assert table[2] == "| personalize | dreambooth | mima | 12.3 | 5.0 | slower | 3.2 | -7.8 | 1.25 | True | 0.878 |"
    run = json.loads((target / "run.json").read_text())
    # params.yaml says nothing of the profile; the run's own is recorded with its overlay
    assert run["profile_name"] == "full" and run["profile"] == {"attack": {"batch_size": 8}}
