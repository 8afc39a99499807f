"""The notebooks run under papermill with micro parameters, in seconds."""

import json
from pathlib import Path

import papermill as pm
import pytest
import torch

from conftest import MICRO, ROOT
from mci_lib.config import for_threat, load_params

pytestmark = pytest.mark.slow


def _overrides(tmp_path, clip_vocab):
    return {
        **MICRO,
        "paths.data_dir": str(tmp_path / "data" / "toy"),
        "paths.models_dir": str(tmp_path / "models"),
        "paths.reports_dir": str(tmp_path / "reports"),
        "paths.clip_vocab": str(clip_vocab),
    }


def _run(name, tmp_path, clip_vocab, **extra):
    pm.execute_notebook(
        str(ROOT / "notebooks" / name),
        str(tmp_path / name),
        parameters={"params_file": str(ROOT / "params.yaml"), "overrides": _overrides(tmp_path, clip_vocab), "progress": False, **extra},
        cwd=str(ROOT),
        kernel_name="python3",
        progress_bar=False,
    )


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory, clip_vocab):
    """The micro pipeline run once: data prep, erase, immunize (both threats)."""
    tmp_path = tmp_path_factory.mktemp("pipeline")
    _run("01_data_prep.ipynb", tmp_path, clip_vocab)
    return tmp_path


def test_data_prep_notebook_runs_with_micro_parameters(pipeline_dir):
    tmp_path = pipeline_dir
    metrics = json.loads((tmp_path / "reports" / "metrics" / "data_prep.json").read_text())
    for key in ("judge_test_accuracy", "judge_reject_rate_on_noise", "base_shape_presence", "base_shape_presence_min", "base_color_accuracy", "seconds"):
        assert key in metrics
    assert 0.0 <= metrics["base_shape_presence_min"] <= metrics["base_shape_presence"] <= 1.0
    assert (tmp_path / "models" / "base" / "model_index.json").is_file()
    assert (tmp_path / "models" / "judge" / "judge.safetensors").is_file()
    assert (tmp_path / "reports" / "figures" / "data_prep" / "base_samples.png").is_file()
    assert (tmp_path / "reports" / "plots" / "pretrain_loss.csv").read_text().startswith("step,unet_loss")


def test_committed_notebooks_are_clean():
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        nb = json.loads(path.read_text())
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        assert not any(c.get("outputs") for c in code), f"{path.name} has outputs"
        assert any("parameters" in c.get("metadata", {}).get("tags", []) for c in code), f"{path.name}: no parameters cell"
        for c in code:
            src = "".join(c["source"])
            assert not any(line.lstrip().startswith(("def ", "class ")) for line in src.splitlines()), f"{path.name} defines code"


def test_erase_and_immunize_notebooks_run_with_micro_parameters(pipeline_dir, clip_vocab):
    from safetensors.torch import load_file

    tmp_path = pipeline_dir
    _run("02a_erase.ipynb", tmp_path, clip_vocab)
    erase = json.loads((tmp_path / "reports" / "metrics" / "erase.json").read_text())
    assert set(erase["erased_presence"]) == {"star", "heart"}
    for threat in ("relearn", "personalize"):
        _run("02_immunize.ipynb", tmp_path, clip_vocab, threat=threat)
        metrics = json.loads((tmp_path / "reports" / "metrics" / f"immunize_{threat}.json").read_text())
        assert set(metrics) == {"mima", "imma_joint", "imma_sequential"}
        for method, m in metrics.items():
            folder = tmp_path / "models" / "immunized" / threat / method
            assert (folder / "model_index.json").is_file() and (folder / "log.csv").is_file()
            delta = load_file(str(folder / "delta.safetensors"))
            assert 0 < len(delta) == m["changed_tensors"]
            # the default immunized set: the whole UNet against re-learning, cross-attention against personalization
            outer = for_threat(load_params(ROOT / "params.yaml"), threat).immunize.outer_params
            assert outer == {"relearn": "unet", "personalize": "cross_attn"}[threat]
            in_cross_attention = [".attn2." in k for k in delta]
            assert all(in_cross_attention) if outer == "cross_attn" else not all(in_cross_attention)
            assert m["steps"] == 2
            assert m["utility_frechet"] >= 0.0


@pytest.mark.parametrize("threat,notebook", [("relearn", "03_relearning_attack.ipynb"), ("personalize", "04_personalization_attack.ipynb")])
def test_attack_notebooks_run_with_micro_parameters(threat, notebook, pipeline_dir, clip_vocab):
    """Needs the immunized models of the test above (same module, run in file order)."""
    tmp_path = pipeline_dir
    if not (tmp_path / "models" / "immunized" / threat).is_dir():
        pytest.fail("the erase/immunize notebook test must run first")
    _run(notebook, tmp_path, clip_vocab)
    result = json.loads((tmp_path / "reports" / "metrics" / f"attack_{threat}.json").read_text())
    p = load_params(ROOT / "params.yaml", None, _overrides(tmp_path, ROOT))
    kinds = list(getattr(p.attack, threat))
    methods = set(p.immunize.methods)
    for key in ("msgr", "msgr_sim", "worst_case_msgr", "steps_to_relearn_ratio", "verdict"):
        assert sorted(result[key]) == sorted(kinds), key
        for kind in kinds:
            assert set(result[key][kind]) == methods, (key, kind)
    swept = [k for k in p.attack.sweep_attacks if k in kinds]
    assert sorted(result["worst_case"]) == sorted(swept)
    # utility before any attack is the immunize stage's measurement
    immunized = json.loads((tmp_path / "reports" / "metrics" / f"immunize_{threat}.json").read_text())
    assert result["utility_presence"] == {"none": immunized["mima"]["start_utility_presence_mean"], **{m: immunized[m]["utility_presence_mean"] for m in methods}}
    assert result["utility_frechet"] == {"none": 0.0, **{m: immunized[m]["utility_frechet"] for m in methods}}
    assert sorted(result["no_immunization_final_presence"]) == sorted(kinds)
    assert sorted(result["attack_is_real"]) == sorted(kinds)
    lines = (tmp_path / "reports" / "plots" / f"attack_{threat}.csv").read_text().splitlines()
    assert lines[0] == "attack,method,seed,step,concept,presence,sim"
    # attacks x models x seeds x (step 0 + 2 checkpoints) x 2 concepts
    assert len(lines) - 1 == len(kinds) * 4 * 1 * 3 * 2
    assert (tmp_path / "reports" / "figures" / f"attack_{threat}" / "presence_vs_step.png").is_file()
    from safetensors.torch import load_file

    samples = load_file(str(tmp_path / "reports" / "figures" / f"attack_{threat}" / "samples.safetensors"))
    # the default budget of every attack, every model, seed, checkpoint (step 0 too) and concept
    assert len(samples) == len(kinds) * 4 * 1 * 3 * 2
    key = f"{kinds[0]}/none/seed{p.attack.seeds[0]}/step0/{getattr(p, threat).targets[0]}"
    assert samples[key].dtype == torch.uint8 and samples[key].shape[1] == 3


def test_scaling_notebook_runs_with_micro_parameters(pipeline_dir, clip_vocab):
    tmp_path = pipeline_dir
    _run("03b_scaling.ipynb", tmp_path, clip_vocab)
    result = json.loads((tmp_path / "reports" / "metrics" / "scaling.json").read_text())
    assert [r["n_concepts"] for r in result["rows"]] == [1, 2]
    assert all(r["seconds"] > 0 and -1e9 < r["msgr_presence"] <= 100 for r in result["rows"])
    assert (tmp_path / "models" / "scaling" / "n1" / "mima" / "model_index.json").is_file()
    # N = 2 has the targets of relearn.targets: read from the main re-learning experiment, not run again
    assert not (tmp_path / "models" / "scaling" / "n2").exists()
    relearn = json.loads((tmp_path / "reports" / "metrics" / "attack_relearn.json").read_text())
    assert result["rows"][1]["msgr_presence"] == pytest.approx(relearn["msgr"]["lora"]["mima"])
    immunized = json.loads((tmp_path / "reports" / "metrics" / "immunize_relearn.json").read_text())
    assert result["rows"][1]["seconds"] == immunized["mima"]["seconds"]
    assert (tmp_path / "reports" / "plots" / "scaling.csv").read_text().startswith("n_concepts,msgr_presence")


def test_figures_notebook_runs_on_the_stage_outputs(pipeline_dir, clip_vocab):
    """Needs both attack stages and the scaling stage of the tests above."""
    tmp_path = pipeline_dir
    if not (tmp_path / "reports" / "metrics" / "attack_personalize.json").is_file():
        pytest.fail("the attack notebook tests must run first")
    _run("05_figures.ipynb", tmp_path, clip_vocab)
    figures = tmp_path / "reports" / "figures" / "results"
    for name in ("relearn_presence_vs_step.png", "personalize_sim_vs_step.png", "utility.png", "relearn_sweep_heatmap.png",
                 "relearn_lora_samples.png", "personalize_custom_diffusion_samples.png", "scaling.png"):
        assert (figures / name).is_file(), name
    table = (tmp_path / "reports" / "tables" / "msgr.md").read_text().splitlines()
    assert table[0].startswith("| threat | attack | method | msgr |")
    p = load_params(ROOT / "params.yaml", None, _overrides(tmp_path, ROOT))
    n_rows = (len(p.attack.relearn) + len(p.attack.personalize)) * len(p.immunize.methods)
    assert len(table) == 2 + n_rows
    assert len((tmp_path / "reports" / "tables" / "msgr.csv").read_text().splitlines()) == 1 + n_rows
    card = (tmp_path / "models" / "release" / "relearn" / "mima" / "README.md").read_text()
    assert card.startswith("---") and "mima" in card
    assert (tmp_path / "models" / "release" / "personalize" / "imma_joint" / "model_index.json").is_file()


def test_study_harness_writes_one_row_per_configuration(pipeline_dir, clip_vocab, tmp_path):
    """benchmarks/study.py on the micro pipeline: one row per configuration, resumable. Needs the
    erased model of the erase notebook test above."""
    import subprocess
    import sys

    if not (pipeline_dir / "models" / "erased").is_dir():
        pytest.fail("the erase notebook test must run first")

    configs = tmp_path / "configs.yaml"
    configs.write_text("- name: a\n- name: b\n  overrides: {immunize.objective: gap}\n")
    out = tmp_path / "study.csv"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "study.py"), str(configs), "--out", str(out),
           "--base-overrides", json.dumps(_overrides(pipeline_dir, clip_vocab))]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
    lines = out.read_text().splitlines()
    header = lines[0].split(",")
    assert len(lines) == 3 and header[:4] == ["name", "threat", "method", "overrides"]
    for column in ("msgr_lora", "msgr_std_lora", "verdict_lora", "steps_ratio_lora", "utility_presence", "utility_frechet", "seconds"):
        assert column in header
    again = subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, text=True)
    assert "skip a" in again.stdout and len(out.read_text().splitlines()) == 3
    assert list(tmp_path.glob("baseline_relearn_*.json"))
    curves = json.loads((tmp_path / "curves" / "b.json").read_text())
    assert {r["method"] for r in curves["rows"]} == {"mima"} and {r["method"] for r in curves["baseline"]} == {"none"}


def test_attack_strength_reports_each_candidate_against_the_bar(pipeline_dir, clip_vocab, tmp_path):
    """benchmarks/attack_strength.py on the micro pipeline: one record per candidate budget, each
    with the final presence per concept and seed and the verdict against the bar. Needs the
    erased model of the erase notebook test above."""
    import subprocess
    import sys

    if not (pipeline_dir / "models" / "erased").is_dir():
        pytest.fail("the erase notebook test must run first")
    out = tmp_path / "strength.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "attack_strength.py"), "relearn", "--kinds", "lora", "--out", str(out),
           "--base-overrides", json.dumps(_overrides(pipeline_dir, clip_vocab)),
           "--set", "attack.lr.lora=1e-3", "--set", "attack.lr.lora=3e-3", "attack.loss_weighting=min_snr"]
    shown = subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, text=True).stdout
    records = json.loads(out.read_text())
    assert [(r["lr"], r["loss_weighting"]) for r in records] == [(1e-3, "none"), (3e-3, "min_snr")]
    p = load_params(ROOT / "params.yaml", None, _overrides(pipeline_dir, clip_vocab))
    for r in records:
        assert set(r["final_presence"]) == set(p.relearn.targets)
        for c, per_seed in r["final_presence_per_seed"].items():
            assert len(per_seed) == len(p.attack.seeds) and abs(r["final_presence"][c] - sum(per_seed.values()) / len(per_seed)) < 1e-9
        assert r["real"] == all(r["final_presence"][c] >= r["bar"][c] for c in r["bar"])
        assert {"0", str(p.attack.steps)} <= set(r["curve"][p.relearn.targets[0]])  # JSON keys: step 0 and the last step
    assert shown.count("lora ") == 2 and ("NOT REAL" in shown) == (not all(r["real"] for r in records))
