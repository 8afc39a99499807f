"""Time and peak memory (process peak RSS so far) of one immunization step on the tiny model (DESIGN section 6).

Measures, with the same per-concept batch: a plain fine-tuning step (forward + backward + AdamW on
the UNet's cross-attention), MIMA ``first_order`` and ``second_order`` steps for N = 1..4, and the
merging layer alone; prints a table with each time's ratio to the plain step and the floors
(2N + 1 plain steps first order, 4N + 1 second order), and writes JSON.

    python benchmarks/immunize_step.py [--out reports/benchmarks/immunize_step.json] [--repeats 5]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mci_lib import immunize as im  # noqa: E402
from mci_lib.config import load_params  # noqa: E402
from mci_lib.merge import MergeFactor  # noqa: E402
from mci_lib.models import build_tiny_pipeline  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--out", default=str(ROOT / "reports" / "benchmarks" / "immunize_step.json"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-concepts", type=int, default=4)
    args = ap.parse_args()

    p = load_params(args.params)
    torch.set_num_threads(p.threads)
    pipe = build_tiny_pipeline(p.model, ROOT / p.paths.clip_vocab, p.world.image_size, seed=0)
    unet = pipe.unet
    cfg = p.immunize
    d = p.model.cross_attention_dim
    L = p.model.max_length
    s = unet.config.sample_size
    g = torch.Generator().manual_seed(0)

    def concept(i):
        return im.ConceptData(f"c{i}", torch.randn(16, 4, s, s, generator=g), torch.randn(16, L, d, generator=g), torch.randn(12, d, generator=g))

    concepts = [concept(i) for i in range(args.max_concepts)]
    prior = concept(99)
    abar = pipe.scheduler.alphas_cumprod.float()
    factor = MergeFactor.from_embeddings(torch.randn(cfg.reg_captions * L, d, generator=g).double(), cfg.merge_delta)
    T = abar.shape[0]

    # plain fine-tuning step on the outer parameter set
    names = im.parameter_names(unet, cfg.outer_params)
    theta = {n: q.detach().clone().requires_grad_(True) for n, q in unet.named_parameters() if n in names}
    frozen = {n: q.detach() for n, q in unet.named_parameters() if n not in theta}
    opt = torch.optim.AdamW(list(theta.values()), lr=1e-5)

    def plain():
        b = im.make_batch(prior.latents, prior.text, cfg.batch_size, T, g)
        loss = im.diffusion_loss_at(unet, {**frozen, **theta}, b, abar)
        opt.zero_grad()
        loss.backward()
        opt.step()

    rows = []
    base = timed(plain, args.repeats)
    rows.append({"step": "plain fine-tuning", "N": 0, "seconds": base, "ratio": 1.0, "floor": 1.0, "peak_rss_mb": peak_rss_mb()})
    inner = im.parameter_names(unet, cfg.inner_params)
    for n in range(1, args.max_concepts + 1):
        ctx = im.MergeContext(factor, [c.target_rows.double() for c in concepts[:n]], cfg.merge, cfg.merge_lam)
        for mode in ("first_order", "second_order"):
            mcfg = replace(cfg, mode=mode)

            def step():
                batches = im._sample_step_batches(concepts[:n], prior, mcfg, T, g)
                second = mode == "second_order"
                with im.double_backward_attention() if second else contextlib.nullcontext():
                    loss, _ = im.outer_objective(unet, theta, frozen, inner, batches, abar, mcfg, ctx, create_graph=second)
                    opt.zero_grad()
                    loss.backward()
                opt.step()

            sec = timed(step, args.repeats)
            floor = 2 * n + 1 if mode == "first_order" else 4 * n + 1
            rows.append({"step": f"MIMA {mode}", "N": n, "seconds": sec, "ratio": sec / base, "floor": floor, "peak_rss_mb": peak_rss_mb()})
        # the merging layer alone: every K/V tensor of the UNet, N adapted copies
        kv = [nm for nm in inner if im.is_kv(nm)]
        params = {**frozen, **theta}
        adapted = [{nm: params[nm] + 0.01 for nm in kv} for _ in range(n)]
        merge_sec = timed(lambda: im.merge_adapted(params, adapted, ctx), args.repeats)
        first = next(r["seconds"] for r in rows if r["N"] == n and r["step"] == "MIMA first_order")
        rows.append({"step": "merge layer", "N": n, "seconds": merge_sec, "ratio": merge_sec / base, "floor": None, "peak_rss_mb": peak_rss_mb(),
                     "share_of_first_order_step": merge_sec / first})

    print(f"{'step':<22}{'N':>3}{'ms':>10}{'x plain':>10}{'floor':>8}{'x floor':>9}{'peak MB':>10}")
    for r in rows:
        floor = "" if r["floor"] is None else f"{r['floor']:.0f}"
        vs_floor = "" if r["floor"] is None else f"{r['ratio'] / r['floor']:.2f}"
        note = f"  ({100 * r['share_of_first_order_step']:.1f}% of a first-order step)" if "share_of_first_order_step" in r else ""
        print(f"{r['step']:<22}{r['N']:>3}{1000 * r['seconds']:>10.1f}{r['ratio']:>10.2f}{floor:>8}{vs_floor:>9}{r['peak_rss_mb']:>10.0f}{note}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"params": {"batch_size": cfg.batch_size, "inner_params": cfg.inner_params, "outer_params": cfg.outer_params, "threads": p.threads}, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
