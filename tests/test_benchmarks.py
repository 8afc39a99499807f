"""The benchmark scripts run at a tiny size on the CPU and write the fields they promise."""

import json
import subprocess
import sys

from conftest import ROOT


def test_gpu_scale_runs_tiny_on_cpu(tmp_path):
    out = tmp_path / "gpu_scale.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_scale.py"), "--size", "tiny", "--device", "cpu", "--repeats", "1",
                    "--concepts", "2", "--uce-concepts", "3", "--out", str(out)], check=True, capture_output=True, cwd=ROOT)
    result = json.loads(out.read_text())
    steps = [(r["step"], r["N"]) for r in result["rows"]]
    assert steps == [("plain fine-tuning", 0), ("MIMA first_order", 2), ("MIMA second_order", 2), ("UCE (3 concepts)", 3)]
    for r in result["rows"]:
        assert r["seconds_per_step"] > 0 and r["peak_memory_gb"] > 0
    for key in ("size", "device", "bf16_autocast", "gradient_checkpointing", "resolution_px"):
        assert key in result["settings"]
