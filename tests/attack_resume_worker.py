"""A micro attack run for the attack resume and data-parallel tests.

``python tests/attack_resume_worker.py MODEL_DIR WORLD_DIR OUT_DIR KIND STEPS TARGET [--resume] [--slow] [--every K] [--lr LR] [--accelerate]``

Attacks the saved micro model in MODEL_DIR with KIND for STEPS steps on TARGET's attack split of
the toy world in WORLD_DIR, yielding at every step; with ``--every K`` it checkpoints into
OUT_DIR/ckpt every K steps. Writes the final trained weights (UNet state and token embeddings) to
OUT_DIR/final.safetensors and the yielded steps to OUT_DIR/steps.json. ``--slow`` sleeps 0.3 s at
every yield (so that a test can kill it mid-way); ``--accelerate`` passes an
``accelerate.Accelerator`` (data parallel under ``accelerate launch``)."""

import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mci_lib import attacks, data  # noqa: E402
from mci_lib.artifacts import save_weights  # noqa: E402
from mci_lib.config import AttackConfig, SamplingConfig  # noqa: E402


def run(model_dir, world_dir, out_dir, kind, steps, target, resume=False, slow=False, every=1, accelerator=None, lr=1e-2, seed=0):
    """The attack; returns (final trained weights, yielded steps). Runs on one thread in the
    worker and the test process alike (bit-identical results need the same thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(model_dir, world_dir, out_dir, kind, steps, target, resume, slow, every, accelerator, lr, seed)
    finally:
        torch.set_num_threads(threads)


def _run(model_dir, world_dir, out_dir, kind, steps, target, resume, slow, every, accelerator, lr, seed):
    out_dir = Path(out_dir)
    records = data.read_index(world_dir)
    concepts = attacks.toy_attack_data(world_dir, records, SimpleNamespace(colors=(), real=()), [target])
    cfg = AttackConfig(steps=steps, checkpoints=tuple(range(1, steps + 1)), batch_size=2, class_images=2, num_inference_steps=2)
    sampling = SamplingConfig(num_inference_steps=2, batch_size=4, samples_per_concept=2)
    budget = attacks.Budget(lr, steps, 2)
    yielded, pipe = [], None
    for step, pipe in attacks.attack(kind, model_dir, concepts, budget, cfg, sampling, seed, cfg.checkpoints, progress=False,
                                     checkpoint_dir=out_dir / "ckpt" if every else None, checkpoint_every=every, resume=resume,
                                     accelerator=accelerator):
        yielded.append(step)
        if slow:
            time.sleep(0.3)
    final = {f"unet.{k}": v.detach().cpu().clone() for k, v in pipe.unet.state_dict().items()}
    final["text_encoder.token_embedding"] = pipe.text_encoder.get_input_embeddings().weight.detach().cpu().clone()
    return final, yielded


if __name__ == "__main__":
    flags = {"--every", "--lr"}
    argv = sys.argv[1:]
    args = [a for i, a in enumerate(argv) if not a.startswith("--") and (i == 0 or argv[i - 1] not in flags)]
    model_dir, world_dir, out_dir, kind, steps, target = args[0], args[1], Path(args[2]), args[3], int(args[4]), args[5]
    every = int(sys.argv[sys.argv.index("--every") + 1]) if "--every" in sys.argv else 0
    lr = float(sys.argv[sys.argv.index("--lr") + 1]) if "--lr" in sys.argv else 1e-2
    accelerator = None
    if "--accelerate" in sys.argv:
        from accelerate import Accelerator

        torch.set_num_threads(1)
        accelerator = Accelerator(cpu=True)
    final, yielded = run(model_dir, world_dir, out_dir, kind, steps, target, resume="--resume" in sys.argv, slow="--slow" in sys.argv,
                         every=every, accelerator=accelerator, lr=lr)
    if accelerator is None or accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_weights(out_dir / "final.safetensors", final)
        (out_dir / "steps.json").write_text(json.dumps(yielded))
