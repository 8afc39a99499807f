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


def test_attention_benchmark_times_both_processors(tmp_path):
    from conftest import CLIP_VOCAB, MICRO

    out = tmp_path / "attention.json"
    overrides = json.dumps({**MICRO, "paths.clip_vocab": str(CLIP_VOCAB)})
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "attention.py"), "--repeats", "1", "--sample-batch", "2",
                    "--overrides", overrides, "--out", str(out)], check=True, capture_output=True, cwd=ROOT)
    rows = json.loads(out.read_text())["rows"]
    assert [r["work"].split(" (")[0] for r in rows] == ["training step", "MIMA second_order step", "sampling"]
    for r in rows:
        assert r["classic_seconds"] > 0 and r["sdpa_seconds"] > 0
        assert abs(r["classic_over_sdpa"] - r["classic_seconds"] / r["sdpa_seconds"]) < 1e-9
