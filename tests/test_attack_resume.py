"""Attacks resume after a kill (DESIGN section 8): an attack killed with SIGKILL and resumed from
its checkpoint ends with the same weights as an uninterrupted run, bit for bit on the CPU, and a
checkpoint of another run is refused."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mci_lib import artifacts, models

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attack_resume_worker import run  # noqa: E402

WORKER = Path(__file__).with_name("attack_resume_worker.py")
STEPS = 6
KILL_AT = 3


@pytest.fixture(scope="module")
def released(released_micro):
    return released_micro


def _kill_mid_way(args, ckpt: Path) -> int:
    proc = subprocess.Popen([sys.executable, str(WORKER), *map(str, args), "--slow", "--every", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        step = artifacts.checkpoint_step(ckpt)
        if step is not None and step >= KILL_AT:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"the worker ended before it was killed: {proc.stderr.read().decode()[-3000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return artifacts.checkpoint_step(ckpt)


# dreambooth_lora: prior preservation; its class images are sampled again on resume, from fixed
# seeds, and the weights only match if they come out the same
@pytest.mark.parametrize("kind,target", [("lora", "star"), ("full", "star"), ("dreambooth_lora", "p1")])
def test_attack_sigkill_then_resume_gives_identical_weights(tmp_path, released, micro_world, kind, target):
    straight, straight_steps = run(released, micro_world, tmp_path / "straight", kind, STEPS, target, every=1)
    assert straight_steps == list(range(STEPS + 1))
    out = tmp_path / "killed"
    killed_at = _kill_mid_way([released, micro_world, out, kind, STEPS, target], out / "ckpt")
    assert KILL_AT <= killed_at < STEPS, "the run was not killed mid-way"
    assert not (out / "final.safetensors").exists()
    resumed, resumed_steps = run(released, micro_world, out, kind, STEPS, target, resume=True, every=1)
    assert resumed_steps == list(range(killed_at + 1, STEPS + 1)), "steps at or before the checkpoint are not yielded again"
    assert set(resumed) == set(straight)
    for name in straight:
        assert torch.equal(resumed[name], straight[name]), name
    if kind == "full":
        base = models.load_pipeline(released).unet.state_dict()
        assert any(not torch.equal(straight[f"unet.{k}"], v) for k, v in base.items()), "the attack did not change the UNet"
    assert json.loads((out / "ckpt" / "state.json").read_text())["step"] == STEPS


def test_attack_resume_refuses_a_checkpoint_of_another_run(tmp_path, released, micro_world):
    run(released, micro_world, tmp_path, "lora", 2, "star", every=1)
    with pytest.raises(ValueError, match=r"checkpoint of another attack run \(kind: checkpoint 'lora', this run 'full'\)"):
        run(released, micro_world, tmp_path, "full", 3, "star", resume=True, every=1)
    with pytest.raises(ValueError, match="seed: checkpoint 0, this run 1"):
        run(released, micro_world, tmp_path, "lora", 3, "star", resume=True, every=1, seed=1)
    with pytest.raises(ValueError, match="past this run's budget of 1 steps"):
        run(released, micro_world, tmp_path, "lora", 1, "star", resume=True, every=1)
    # an immunization checkpoint in the attack's folder
    theta = {"w": torch.zeros(2, requires_grad=True)}
    artifacts.save_training_state(tmp_path / "ckpt", 1, theta, torch.optim.AdamW(list(theta.values())), {"batches": torch.Generator()}, extra={"log": {}})
    with pytest.raises(ValueError, match="not an attack checkpoint"):
        run(released, micro_world, tmp_path, "lora", 3, "star", resume=True, every=1)
