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


def _run_folder(root):
    for folder in ("reports/tables", "reports/metrics", "reports/figures/results", "reports/notebooks"):
        (root / folder).mkdir(parents=True)
    (root / "reports/tables/msgr.md").write_text("| a |\n")
    (root / "reports/metrics/attack_relearn.json").write_text('{"msgr": {}}')
    (root / "reports/figures/results/curve.png").write_bytes(b"\x89PNG")
    meta = {"papermill": {"start_time": "t0", "end_time": "t1", "duration": 12.345}}
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
    assert run["stages"] == {"03_relearning_attack": {"start": "t0", "end": "t1", "seconds": 12.3}}
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
