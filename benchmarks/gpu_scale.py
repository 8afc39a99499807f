"""Seconds per step and peak memory at Stable Diffusion scale (DESIGN section 8).

Builds the UNet of the chosen size from its config with random weights (no download):
``sd14`` is the SD v1.4 UNet (320-640-1280-1280 channels, 768-wide cross-attention, 64x64
latents for 512 px images); ``tiny`` is the tiny profile's UNet, to run this script on a CPU in
the tests. Text states are random (77 x 768 for sd14), as the step costs do not depend on them.

Measures: a plain fine-tuning step (forward, backward, AdamW on the cross-attention
projections), MIMA ``first_order`` and ``second_order`` steps for each N of ``--concepts``, and
UCE for ``--uce-concepts`` concepts. On a GPU: bf16 autocast, the flash
SDPA kernel where a single backward suffices and the math kernel for the double backward of
second-order MIMA; only the cross-attention tensors are trained (and would be saved). Prints a
table and writes JSON with one row per measurement: ``step``, ``N``, ``seconds_per_step``,
``peak_memory_gb`` (GPU: ``torch.cuda.max_memory_allocated``; CPU: the process's peak RSS), and
the settings.

    python benchmarks/gpu_scale.py --size sd14 --device cuda [--out reports/benchmarks/gpu_scale.json]
    python benchmarks/gpu_scale.py --size tiny --device cpu --repeats 1   # what the tests run
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mci_lib import immunize as im  # noqa: E402
from mci_lib.artifacts import write_json  # noqa: E402
from mci_lib.config import ImmunizeConfig  # noqa: E402
from mci_lib.erase import uce_edit  # noqa: E402
from mci_lib.merge import MergeFactor  # noqa: E402

SIZES = {
    # the SD v1.4 UNet's architecture (diffusers' UNet2DConditionModel defaults are SD v1.x's)
    "sd14": dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280)),
    "tiny": dict(sample_size=16, cross_attention_dim=64, attention_head_dim=8, layers_per_block=1, block_out_channels=(64, 128),
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
}


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def timed(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up (and kernel selection)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="sd14")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-size", type=int, default=1, help="per concept, inner and outer")
    ap.add_argument("--concepts", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--uce-concepts", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    # off by default: the immunization evaluates the UNet through torch.func.functional_call, and
    # diffusers' gradient checkpointing recomputes the forward in the backward pass outside that
    # call, with the module's own weights (measured on an H100: torch raises CheckpointError)
    ap.add_argument("--checkpointing", action="store_true", help="gradient checkpointing (fails with functional_call; kept to show it)")
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "benchmarks" / "gpu_scale.json")
    args = ap.parse_args()

    device = torch.device(args.device)
    bf16 = device.type == "cuda"
    # 1. the UNet from its config, random weights; only the cross-attention projections train
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SIZES[args.size]).to(device)
    checkpointing = args.checkpointing and device.type == "cuda"
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    d, L, s = unet.config.cross_attention_dim, 77, unet.config.sample_size
    cfg = ImmunizeConfig(batch_size=args.batch_size, inner_params="kv", outer_params="cross_attn")
    g = torch.Generator().manual_seed(0)

    def concept(i: int) -> im.ConceptData:
        return im.ConceptData(f"c{i}", torch.randn(4, 4, s, s, generator=g).to(device), torch.randn(4, L, d, generator=g).to(device),
                              torch.randn(6, d, generator=g).to(device))

    concepts = [concept(i) for i in range(max(args.concepts))]
    prior = concept(99)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    abar = torch.cumprod(1 - betas, 0).to(device)
    names = im.parameter_names(unet, cfg.outer_params)
    theta = {n: q.detach().clone().requires_grad_(True) for n, q in unet.named_parameters() if n in names}
    frozen = {n: q.detach() for n, q in unet.named_parameters() if n not in theta}
    frozen.update(dict(unet.named_buffers()))
    opt = torch.optim.AdamW(list(theta.values()), lr=1e-5)
    inner = im.parameter_names(unet, cfg.inner_params)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    rows = []

    def record(step: str, n: int, fn) -> None:
        reset_peak(device)
        sec = timed(fn, args.repeats, device)
        rows.append({"step": step, "N": n, "seconds_per_step": sec, "peak_memory_gb": peak_memory_gb(device)})

    # 2. a plain fine-tuning step
    def plain():
        b = im.make_batch(prior.latents, prior.text, cfg.batch_size, 1000, g)
        with autocast():
            loss = im.diffusion_loss_at(unet, {**frozen, **theta}, b, abar)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    record("plain fine-tuning", 0, plain)
    # 3. MIMA steps; the merge's regularization set is random token rows, factored once
    K = torch.randn(100 * L, d, generator=g, dtype=torch.float64).to(device)
    factor = MergeFactor.from_embeddings(K, cfg.merge_delta)
    for n in args.concepts:
        ctx = im.MergeContext(factor, [c.target_rows.double() for c in concepts[:n]])
        for mode in ("first_order", "second_order"):
            mcfg = replace(cfg, mode=mode)
            second = mode == "second_order"

            def step():
                batches = im._sample_step_batches(concepts[:n], prior, mcfg, 1000, g)
                # the double backward needs the math attention kernel; a single backward keeps flash
                with im.double_backward_attention() if second else contextlib.nullcontext(), autocast():
                    loss, _ = im.outer_objective(unet, theta, frozen, inner, batches, abar, mcfg, ctx, create_graph=second)
                opt.zero_grad(set_to_none=True)
                with im.double_backward_attention() if second else contextlib.nullcontext():
                    loss.backward()
                opt.step()

            record(f"MIMA {mode}", n, step)
    # 4. UCE on every cross-attention K/V for --uce-concepts concepts (closed form, no gradient)
    kv = {n: p for n, p in unet.named_parameters() if im.is_kv(n)}
    c = torch.randn(args.uce_concepts * 4, d, generator=g).to(device)
    guide = torch.randn(args.uce_concepts * 4, d, generator=g).to(device)
    keep = torch.randn(200, d, generator=g).to(device)

    @torch.no_grad()
    def uce():
        for W in kv.values():
            uce_edit(W.float(), c, guide, keep, 0.1, 0.1)

    record(f"UCE ({args.uce_concepts} concepts)", args.uce_concepts, uce)

    # 5. the table and the JSON
    settings = {"size": args.size, "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "bf16_autocast": bf16, "gradient_checkpointing": checkpointing, "batch_size_per_concept": args.batch_size,
                "resolution_px": 8 * s, "trained": "cross-attention projections", "torch": torch.__version__}
    print(f"{'step':<24}{'N':>4}{'s/step':>10}{'peak GB':>10}   ({settings['device_name']}, {settings['resolution_px']} px)")
    for r in rows:
        print(f"{r['step']:<24}{r['N']:>4}{r['seconds_per_step']:>10.3f}{r['peak_memory_gb']:>10.2f}")
    write_json(args.out, {"settings": settings, "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
