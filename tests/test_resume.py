"""Resume after a kill (DESIGN section 8): an immunization run killed with SIGKILL and resumed ends
with the same weights as an uninterrupted run, bit for bit on the CPU."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mci_lib import artifacts

WORKER = Path(__file__).with_name("resume_worker.py")
STEPS = 8


def test_sigkill_then_resume_gives_identical_weights(tmp_path):
    from resume_worker import run

    straight = run(tmp_path / "straight" / "ckpt", STEPS)
    ckpt = tmp_path / "killed" / "ckpt"
    proc = subprocess.Popen([sys.executable, str(WORKER), str(ckpt), str(STEPS), "--slow"])
    deadline = time.time() + 120
    while time.time() < deadline:
        state = ckpt / "state.json"
        if state.is_file() and json.loads(state.read_text())["step"] >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = json.loads((ckpt / "state.json").read_text())["step"]
    assert 3 <= killed_at < STEPS, "the run was not killed mid-way"
    assert not (tmp_path / "killed" / "final.safetensors").exists()
    resumed = run(ckpt, STEPS, resume=True)
    assert set(resumed) == set(straight)
    for name in straight:
        assert torch.equal(resumed[name], straight[name]), name


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path):
    from resume_worker import run

    run(tmp_path / "ckpt", 2)
    state = artifacts.load_weights(tmp_path / "ckpt" / "state.safetensors")
    state.pop(next(k for k in state if k.startswith("param.")))
    artifacts.save_weights(tmp_path / "ckpt" / "state.safetensors", state)
    with pytest.raises(ValueError, match="checkpoint tensors do not match"):
        run(tmp_path / "ckpt", 4, resume=True)
