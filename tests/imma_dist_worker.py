"""IMMA on the micro UNet of resume_worker (its first concept, or ``imma_joint`` on both), in one
process or data-parallel under ``accelerate launch``:
``python tests/imma_dist_worker.py OUT.safetensors MODE METHOD INNER_STEPS OBJECTIVE``."""

import sys
from dataclasses import replace
from pathlib import Path

import torch
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from resume_worker import build  # noqa: E402

from mci_lib import immunize as im  # noqa: E402
from mci_lib.artifacts import save_weights  # noqa: E402


def run(mode: str, method: str, inner_steps: int, objective: str, accelerator=None):
    unet, concepts, prior, abar, ctx, cfg = build()
    cfg = replace(cfg, steps=3, checkpoint_every=0, mode=mode, inner_steps=inner_steps, batch_size=4, objective=objective)
    targets = concepts[:1] if method == "imma" else concepts
    with im.double_backward_attention():
        return im.immunize(method, unet, targets, prior, abar, cfg, ctx, seed=5, progress=False, accelerator=accelerator)


if __name__ == "__main__":
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    result = run(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], accelerator)
    if accelerator.is_main_process:
        save_weights(sys.argv[1], result.theta, metadata={"processes": str(accelerator.num_processes)})
