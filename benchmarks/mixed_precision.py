"""Time MIMA outer steps in float32 and under bfloat16 autocast (``immunize.mixed_precision``).

For one threat's ``immunize`` settings (re-learning by default: the whole-UNet attacker and
immunized set) and N = 2 synthetic concepts on the tiny model, each round runs
``mci_lib.immunize.run_mima`` for ``--steps`` outer steps once per precision, the order
alternating from round to round so that a machine drifting in speed hits both alike. Prints the
median seconds per step and the ratio bf16 / fp32 of the same round, and writes JSON. Run it on the
machine that will immunize: the committed ratio is from a CPU with ``avx512_bf16``, and one without
bfloat16 arithmetic may gain nothing.

    python benchmarks/mixed_precision.py [--threat relearn] [--rounds 4] [--steps 2] [--out reports/benchmarks/mixed_precision.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mci_lib import immunize as im  # noqa: E402
from mci_lib.config import for_threat, load_params  # noqa: E402
from mci_lib.models import build_tiny_pipeline  # noqa: E402
from synthetic import merge_context, synthetic_inputs  # noqa: E402  (benchmarks/synthetic.py, beside this script)

PRECISIONS = ("fp32", "bf16")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--threat", default="relearn", help="whose immunize settings to time: relearn (whole UNet, the default) or personalize (K/V attacker)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2, help="outer steps per timed run")
    ap.add_argument("--out", default=str(ROOT / "reports" / "benchmarks" / "mixed_precision.json"))
    args = ap.parse_args()

    p = for_threat(load_params(args.params), args.threat)
    torch.set_num_threads(p.threads)
    pipe = build_tiny_pipeline(p.model, ROOT / p.paths.clip_vocab, p.world.image_size, seed=0)
    cfg = replace(p.immunize, steps=args.steps)
    concepts, prior, factor = synthetic_inputs(p, pipe.unet, cfg, 2, torch.Generator().manual_seed(0))
    ctx = merge_context(factor, concepts, cfg)
    abar = pipe.scheduler.alphas_cumprod.float()

    def per_step(mp: str) -> float:
        result = im.run_mima(pipe.unet, concepts, prior, abar, replace(cfg, mixed_precision=mp), ctx, seed=0, progress=False)
        return result.seconds / args.steps

    for mp in PRECISIONS:  # warm-up
        per_step(mp)
    times: dict[str, list[float]] = {mp: [] for mp in PRECISIONS}
    for r in range(args.rounds):
        for mp in PRECISIONS if r % 2 == 0 else PRECISIONS[::-1]:
            times[mp].append(per_step(mp))
    ratios = [b / f for f, b in zip(times["fp32"], times["bf16"])]
    print(f"{'precision':<10}{'s / step':>10}  rounds")
    for mp in PRECISIONS:
        print(f"{mp:<10}{statistics.median(times[mp]):>10.3f}  {' '.join(f'{t:.3f}' for t in times[mp])}")
    print(f"bf16 / fp32 (median of per-round ratios): {statistics.median(ratios):.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: getattr(cfg, k) for k in ("mode", "batch_size", "inner_steps", "inner_params", "outer_params", "prior_weight", "utility")}
    out.write_text(json.dumps({"params": {**settings, "threat": args.threat, "steps": args.steps, "threads": p.threads, "torch": torch.__version__},
                               "seconds_per_step": times, "median": {mp: statistics.median(v) for mp, v in times.items()},
                               "ratio_bf16_to_fp32": statistics.median(ratios)}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
