"""MIMA on the micro UNet of resume_worker, in one process or concept-parallel under
``accelerate launch``: ``python tests/mima_dist_worker.py OUT.safetensors``."""

import sys
from dataclasses import replace
from pathlib import Path

import torch
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from resume_worker import build  # noqa: E402

from mci_lib import immunize as im  # noqa: E402
from mci_lib.artifacts import save_weights  # noqa: E402

if __name__ == "__main__":
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    unet, concepts, prior, abar, ctx, cfg = build()
    cfg = replace(cfg, steps=3, checkpoint_every=0, mode=sys.argv[2] if len(sys.argv) > 2 else "second_order")
    with im.double_backward_attention():
        result = im.run_mima(unet, concepts, prior, abar, cfg, ctx, seed=5, progress=False, accelerator=accelerator)
    if accelerator.is_main_process:
        save_weights(sys.argv[1], result.theta, metadata={"processes": str(accelerator.num_processes)})
