"""Time and peak memory (process peak RSS so far) of one immunization step on the tiny model (DESIGN section 6).

Measures, with the same per-concept batch: a plain fine-tuning step (forward + backward + AdamW on
the UNet's cross-attention), MIMA ``first_order`` and ``second_order`` steps for N = 1..4, and the
merging layer alone; prints a table with each time's ratio to the plain step and the floors, and
writes JSON. With k unrolled attacker steps a first-order step needs k N inner passes, N outer
passes and one utility pass, a floor of (k + 1) N + 1 plain steps, and a second-order step about
twice the passes, 2 (k + 1) N + 1. ``--inner-steps`` defaults to 1, the setting the floors of the
immunization issue are stated for (2N + 1 and 4N + 1); the other settings are params.yaml's, in
float32 (``benchmarks/mixed_precision.py`` times bfloat16).
Each ratio is the median over rounds of (step time / a plain step timed just before it). The
``work`` column is the floor counted from the passes the step really makes, each timed here in
plain steps, as separate UNet calls: the attacker's pass holds the concept and the prior batch,
the utility pass all N prior batches, and the distillation term a no-grad pass of the starting
model. With an attacker that trains Linear layers only (the K/V default here), MIMA runs the N
concepts' attacker passes of each inner step as one UNet call, and the outer concept pass with the
utility pass (``mci_lib.immunize.grouped_predictions``): a ratio to ``work`` below 1 is that batching.

    python benchmarks/immunize_step.py [--out reports/benchmarks/immunize_step.json] [--repeats 5] [--inner-steps 1]
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
from mci_lib.config import for_threat, load_params  # noqa: E402
from mci_lib.models import build_tiny_pipeline  # noqa: E402
from synthetic import merge_context, synthetic_inputs  # noqa: E402  (benchmarks/synthetic.py, beside this script)


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


def timed_against(fn, plain, repeats: int) -> tuple[float, float]:
    """Median time of ``fn`` and the median of its per-round ratio to a ``plain`` step timed in
    the same round, so a machine that drifts in speed (a shared VM does) moves both alike."""
    fn()  # warm-up
    times, ratios = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        plain()
        t1 = time.perf_counter()
        fn()
        t2 = time.perf_counter()
        times.append(t2 - t1)
        ratios.append((t2 - t1) / (t1 - t0))
    return statistics.median(times), statistics.median(ratios)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--out", default=str(ROOT / "reports" / "benchmarks" / "immunize_step.json"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-concepts", type=int, default=4)
    ap.add_argument("--inner-steps", type=int, default=1, help="unrolled attacker steps (params.yaml's immunize.inner_steps is the pipeline's)")
    ap.add_argument("--threat", default="personalize", help="whose immunize settings to time (params.yaml sets the parameter sets per threat): personalize, the default, is the K/V attacker and cross-attention immunized set the committed results were measured with; relearn is the whole UNet")
    args = ap.parse_args()

    p = for_threat(load_params(args.params), args.threat)
    torch.set_num_threads(p.threads)
    pipe = build_tiny_pipeline(p.model, ROOT / p.paths.clip_vocab, p.world.image_size, seed=0)
    unet = pipe.unet
    # float32: these steps call outer_objective directly, outside run_mima's autocast
    # (benchmarks/mixed_precision.py times bf16 against it)
    cfg = replace(p.immunize, inner_steps=args.inner_steps, mixed_precision="fp32")
    g = torch.Generator().manual_seed(0)
    concepts, prior, factor = synthetic_inputs(p, unet, cfg, args.max_concepts, g)
    abar = pipe.scheduler.alphas_cumprod.float()
    T = abar.shape[0]

    # plain fine-tuning step on the outer parameter set
    names = im.parameter_names(unet, cfg.outer_params)
    theta = {n: q.detach().clone().requires_grad_(True) for n, q in unet.named_parameters() if n in names}
    frozen = {n: q.detach() for n, q in unet.named_parameters() if n not in theta}
    # as run_mima does: the distillation utility term needs the starting weights
    teacher = {n: v.detach().clone() for n, v in theta.items()} if cfg.utility == "distill" else None
    opt = torch.optim.AdamW(list(theta.values()), lr=1e-5)

    def plain():
        b = im.make_batch(prior.latents, prior.text, cfg.batch_size, T, g)
        loss = im.diffusion_loss_at(unet, {**frozen, **theta}, b, abar)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def pass_at(size: int, backward: bool):
        """One UNet pass on ``size`` samples at theta (with its backward, or without a graph)."""
        def run():
            b = im.make_batch(prior.latents, prior.text, size, T, g)
            with contextlib.nullcontext() if backward else torch.no_grad():
                loss = im.diffusion_loss_at(unet, {**frozen, **theta}, b, abar)
            if backward:
                loss.backward()
                opt.zero_grad()
        return run

    # what one step evaluates, in plain steps measured here: an inner pass carries the concept and
    # the prior batch (2B), the N outer concept batches go through one call (NB), the utility pass
    # takes the N prior batches (NB) and distillation adds a no-grad teacher pass on them
    cost: dict[tuple[int, bool], float] = {}

    def relative(size: int, backward: bool) -> float:
        if (size, backward) not in cost:
            cost[size, backward] = timed_against(pass_at(size, backward), plain, args.repeats)[1]
        return cost[size, backward]

    def work_floor(mode: str, n: int) -> float:
        B = cfg.batch_size
        inner = n * cfg.inner_steps * relative(2 * B if cfg.prior_weight else B, True)
        outer = relative(n * B, True)
        utility = relative(n * B, True) + (relative(n * B, False) if cfg.utility == "distill" else 0.0)
        return (inner + outer if mode == "first_order" else 2 * (inner + outer)) + utility

    rows = []
    base = timed(plain, args.repeats)
    rows.append({"step": "plain fine-tuning", "N": 0, "seconds": base, "ratio": 1.0, "floor": 1.0, "peak_rss_mb": peak_rss_mb()})
    inner = im.parameter_names(unet, cfg.inner_params)
    for n in range(1, args.max_concepts + 1):
        ctx = merge_context(factor, concepts[:n], cfg)
        for mode in ("first_order", "second_order"):
            mcfg = replace(cfg, mode=mode)

            def step():
                batches = im._sample_step_batches(concepts[:n], prior, mcfg, T, g)
                second = mode == "second_order"
                with im.double_backward_attention() if second else contextlib.nullcontext():
                    loss, _ = im.outer_objective(unet, theta, frozen, inner, batches, abar, mcfg, ctx, create_graph=second, teacher=teacher)
                    opt.zero_grad()
                    loss.backward()
                opt.step()

            sec, ratio = timed_against(step, plain, args.repeats)
            passes = (cfg.inner_steps + 1) * n
            floor = passes + 1 if mode == "first_order" else 2 * passes + 1
            rows.append({"step": f"MIMA {mode}", "N": n, "seconds": sec, "ratio": ratio, "floor": floor, "work_floor": work_floor(mode, n), "peak_rss_mb": peak_rss_mb()})
        # the merging layer alone: every K/V tensor of the UNet, N adapted copies
        kv = [nm for nm in inner if im.is_kv(nm)]
        params = {**frozen, **theta}
        adapted = [{nm: params[nm] + 0.01 for nm in kv} for _ in range(n)]
        merge_sec, merge_ratio = timed_against(lambda: im.merge_adapted(params, adapted, ctx), plain, args.repeats)
        first = next(r["seconds"] for r in rows if r["N"] == n and r["step"] == "MIMA first_order")
        rows.append({"step": "merge layer", "N": n, "seconds": merge_sec, "ratio": merge_ratio, "floor": None, "peak_rss_mb": peak_rss_mb(),
                     "share_of_first_order_step": merge_sec / first})

    print(f"{'step':<22}{'N':>3}{'ms':>10}{'x plain':>10}{'floor':>8}{'x floor':>9}{'work':>8}{'x work':>8}{'peak MB':>10}")
    for r in rows:
        floor = "" if r["floor"] is None else f"{r['floor']:.0f}"
        vs_floor = "" if r["floor"] is None else f"{r['ratio'] / r['floor']:.2f}"
        note = f"  ({100 * r['share_of_first_order_step']:.1f}% of a first-order step)" if "share_of_first_order_step" in r else ""
        work = f"{r['work_floor']:.2f}" if "work_floor" in r else ""
        vs_work = f"{r['ratio'] / r['work_floor']:.2f}" if "work_floor" in r else ""
        print(f"{r['step']:<22}{r['N']:>3}{1000 * r['seconds']:>10.1f}{r['ratio']:>10.2f}{floor:>8}{vs_floor:>9}{work:>8}{vs_work:>8}{r['peak_rss_mb']:>10.0f}{note}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: getattr(cfg, k) for k in ("batch_size", "inner_steps", "inner_params", "outer_params", "prior_weight", "utility", "merge", "mixed_precision")}
    out.write_text(json.dumps({"params": {**settings, "threads": p.threads, "torch": torch.__version__}, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
