"""The notebooks run under papermill with micro parameters, in seconds."""

import json
from pathlib import Path

import papermill as pm
import pytest

from conftest import MICRO, ROOT

pytestmark = pytest.mark.slow


def _overrides(tmp_path, clip_vocab):
    return {
        **MICRO,
        "paths.data_dir": str(tmp_path / "data" / "toy"),
        "paths.models_dir": str(tmp_path / "models"),
        "paths.reports_dir": str(tmp_path / "reports"),
        "paths.clip_vocab": str(clip_vocab),
    }


def test_data_prep_notebook_runs_with_micro_parameters(tmp_path, clip_vocab):
    out = tmp_path / "01_data_prep.ipynb"
    pm.execute_notebook(
        str(ROOT / "notebooks" / "01_data_prep.ipynb"),
        str(out),
        parameters={"params_file": str(ROOT / "params.yaml"), "overrides": _overrides(tmp_path, clip_vocab), "progress": False},
        cwd=str(ROOT),
        kernel_name="python3",
        progress_bar=False,
    )
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
