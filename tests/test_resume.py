"""Resume after a kill (DESIGN section 8): an immunization run killed with SIGKILL and resumed ends
with the same weights as an uninterrupted run, bit for bit on the CPU."""

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
    proc = subprocess.Popen([sys.executable, str(WORKER), str(ckpt), str(STEPS), "--slow"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        # read through the library, as a resume does: a kill between the checkpoint's two renames
        # leaves the previous checkpoint parked, and that is what a resume starts from
        step = artifacts.checkpoint_step(ckpt)
        if step is not None and step >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"the worker ended before it was killed: {proc.stderr.read().decode()[-3000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = artifacts.checkpoint_step(ckpt)
    assert killed_at is not None, "no checkpoint after the kill"
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


def test_a_kill_between_the_checkpoint_renames_keeps_the_previous_checkpoint(tmp_path):
    # the state atomic_dir leaves when killed after parking the old folder and before renaming the
    # new one into place: only the hidden previous version exists
    tensors = {"w": torch.ones(2)}
    opt = torch.optim.SGD(list(tensors.values()), lr=0.1)
    artifacts.save_training_state(tmp_path / "ckpt", 5, tensors, opt, {})
    (tmp_path / "ckpt").rename(tmp_path / ".ckpt.old")
    assert artifacts.checkpoint_step(tmp_path / "ckpt") == 5
    assert not (tmp_path / ".ckpt.old").exists()
    # and a leftover previous version beside a whole checkpoint is cleared by the next save
    artifacts.save_training_state(tmp_path / "ckpt", 6, tensors, opt, {})
    (tmp_path / ".ckpt.old").mkdir()
    artifacts.save_training_state(tmp_path / "ckpt", 7, tensors, opt, {})
    assert artifacts.checkpoint_step(tmp_path / "ckpt") == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
