"""Time the tiny model's UNet work under each attention processor (``models.set_attention``).

For the classic processor (diffusers' ``AttnProcessor``) and SDPA (``AttnProcessor2_0``, the
default), in one run on the same weights and inputs: an attack-sized training step (forward,
backward, AdamW on the whole UNet), a MIMA ``second_order`` outer step with the profile's
``immunize`` settings (N = 2 concepts, ``inner_steps`` unrolled attacker steps), and DDIM
sampling of one batch. Prints a table with the classic/SDPA ratio per row and writes JSON; the
processors alternate per repeat so that machine noise hits both alike.

    python benchmarks/attention.py [--out reports/benchmarks/attention.json] [--repeats 5] [--overrides JSON]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mci_lib import immunize as im  # noqa: E402
from mci_lib.config import for_threat, load_params  # noqa: E402
from mci_lib.models import build_tiny_pipeline, set_attention  # noqa: E402
from mci_lib.sampling import sample_images  # noqa: E402
from synthetic import merge_context, synthetic_inputs  # noqa: E402  (benchmarks/synthetic.py, beside this script)

PROCESSORS = ("classic", "sdpa")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--overrides", default="{}", help='dotted keys as JSON, as the notebooks take them: \'{"immunize.inner_steps": 1}\'')
    ap.add_argument("--out", default=str(ROOT / "reports" / "benchmarks" / "attention.json"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sample-batch", type=int, default=None, help="images per sampling call (default: sampling.batch_size)")
    ap.add_argument("--threat", default="personalize", help="whose immunize settings to time (params.yaml sets the parameter sets per threat): personalize, the default, is the K/V attacker and cross-attention immunized set the committed results were measured with; relearn is the whole UNet")
    args = ap.parse_args()

    p = for_threat(load_params(args.params, overrides=args.overrides), args.threat)
    torch.set_num_threads(p.threads)
    pipe = build_tiny_pipeline(p.model, ROOT / p.paths.clip_vocab, p.world.image_size, seed=0)
    unet = pipe.unet
    # float32: the MIMA step calls outer_objective directly, outside run_mima's autocast
    cfg = replace(p.immunize, mixed_precision="fp32")
    g = torch.Generator().manual_seed(0)
    abar = pipe.scheduler.alphas_cumprod.float()
    T = abar.shape[0]
    concepts, prior, factor = synthetic_inputs(p, unet, cfg, 2, g)
    ctx = merge_context(factor, concepts, cfg)
    outer, inner = im.parameter_names(unet, cfg.outer_params), im.parameter_names(unet, cfg.inner_params)
    theta = {n: q.detach().clone().requires_grad_(True) for n, q in unet.named_parameters() if n in outer}
    frozen = {n: q.detach() for n, q in unet.named_parameters() if n not in theta}
    opt = torch.optim.AdamW(list(unet.parameters()) + list(theta.values()), lr=0.0)  # lr 0: every repeat sees the same weights
    attack_batch = 2 * p.attack.batch_size  # instance plus prior-preservation rows

    def train_step():
        b = im.make_batch(prior.latents, prior.text, attack_batch, T, torch.Generator().manual_seed(1))
        loss = im.diffusion_loss_at(unet, dict(unet.named_parameters()), b, abar)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def mima_step():
        batches = im._sample_step_batches(concepts, prior, cfg, T, torch.Generator().manual_seed(2))
        with im.double_backward_attention():
            loss, _ = im.outer_objective(unet, theta, frozen, inner, batches, abar, cfg, ctx, create_graph=True)
            opt.zero_grad()
            loss.backward()

    n_images = args.sample_batch or p.sampling.batch_size

    def sample():
        sample_images(pipe, ["a photo of a red star"] * n_images, list(range(n_images)), p.sampling.num_inference_steps, p.sampling.guidance_scale, n_images)

    work = {
        f"training step (batch {attack_batch}, whole UNet)": train_step,
        f"MIMA second_order step (N=2, inner_steps {cfg.inner_steps})": mima_step,
        f"sampling ({n_images} images, {p.sampling.num_inference_steps} DDIM steps)": sample,
    }
    rows = []
    for name, fn in work.items():
        times = {k: [] for k in PROCESSORS}
        for k in PROCESSORS:  # warm-up
            set_attention(unet, k)
            fn()
        for _ in range(args.repeats):
            for k in PROCESSORS:
                set_attention(unet, k)
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append({"work": name, **{f"{k}_seconds": med[k] for k in PROCESSORS}, "classic_over_sdpa": med["classic"] / med["sdpa"]})

    print(f"{'work':<52}{'classic ms':>12}{'sdpa ms':>10}{'classic/sdpa':>14}")
    for r in rows:
        print(f"{r['work']:<52}{1000 * r['classic_seconds']:>12.1f}{1000 * r['sdpa_seconds']:>10.1f}{r['classic_over_sdpa']:>14.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"params": {"threads": p.threads, "repeats": args.repeats, "device": "cpu", "torch": torch.__version__}, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
