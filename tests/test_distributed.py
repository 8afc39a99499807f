"""Concept-parallel MIMA through accelerate (DESIGN section 8): two CPU processes (gloo) give the
same immunized weights as one process."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mci_lib.artifacts import load_weights

WORKER = Path(__file__).with_name("mima_dist_worker.py")


@pytest.mark.parametrize("mode", ["second_order", "first_order"])
def test_two_processes_match_one(tmp_path, mode):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    subprocess.run([sys.executable, str(WORKER), str(one), mode], check=True, env=env, capture_output=True)
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    launched = subprocess.run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                               "--dynamo_backend", "no", str(WORKER), str(two), mode], env=env, capture_output=True, text=True)
    assert launched.returncode == 0, launched.stderr[-3000:]
    a, b = load_weights(one), load_weights(two)
    assert set(a) == set(b) and a
    moved = max((a[k] - b[k]).abs().max().item() for k in a)
    assert moved <= 1e-5, f"two processes differ from one by {moved}"
    start = {n: p for n, p in __import__("resume_worker").build()[0].named_parameters()}
    assert any(not torch.equal(a[k], start[k]) for k in a), "the run did not change the weights"
