"""The immunization issue's own targets, per configuration, without attacks (DESIGN section 6).

For each configuration (the same YAML as ``benchmarks/study.py``: a name, a ``method``, a
``threat`` and dotted ``overrides``), immunize the threat's starting model exactly as
``notebooks/02_immunize.ipynb`` does and measure what that stage reports: the concept loss at the
simulated attacker's merged weights and the utility (denoising) loss on fixed evaluation batches
before and after, and the utility presence of the non-target shapes (``sampling`` of the params,
64 samples per shape by default) against the starting model's. Prints a table and writes one row
per configuration to ``--out`` with the three checks the issue sets:

- ``concept_ratio`` = concept_loss_end / concept_loss_start, target >= 5;
- ``utility_ratio`` = utility_loss_end / utility_loss_start, target <= 1.5;
- ``utility_drop`` = start utility presence - utility presence, target <= 0.10.

Rows already in the CSV are skipped (an interrupted sweep resumes). It needs the pipeline's toy
world, base, erased and judge models at the params' paths (``dvc repro erase``).

    python benchmarks/immunize_targets.py benchmarks/immunize_targets.yaml [--only NAME ...] \\
        [--out reports/research/immunize_targets.csv]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))

from study import START, append_row, done_names, read_configs  # noqa: E402

from mci_lib import data, immunize, judge, metrics, models, pretrain  # noqa: E402
from mci_lib.config import for_threat, load_params  # noqa: E402

TARGETS = {"concept_ratio": 5.0, "utility_ratio": 1.5, "utility_drop": 0.10}


def measure(p, threat: str, method: str, start_tables: dict) -> dict:
    """Immunize ``threat``'s starting model with ``method`` under ``p`` and measure the stage's
    metrics (the steps of the immunize notebook, numbered the same way)."""
    models_dir = Path(p.paths.models_dir)
    targets = list(getattr(p, threat).targets)
    others = [s for s in p.world.shapes if s not in targets]
    the_judge = judge.load_judge(models_dir / "judge")
    pipe = models.load_pipeline(models_dir / START[threat])
    records = data.read_index(p.paths.data_dir)
    # 1. the defense data, the merge's fixed inputs and the fixed evaluation batches
    vae_latents = lambda images: pretrain.encode_latents(pipe.vae, images)  # noqa: E731
    concepts, prior = immunize.toy_threat_concepts(pipe, p.paths.data_dir, records, p.world, targets, vae_latents, prior_size=256, seed=p.seed, utility_uncond=p.immunize.utility_uncond, merge_rows=p.immunize.merge_rows)
    ctx = immunize.merge_context(pipe, concepts, data.regularization_captions(p.world, p.immunize.reg_captions, p.seed, exclude=targets), p.immunize)
    alphas = pipe.scheduler.alphas_cumprod.float()
    inner_names = immunize.parameter_names(pipe.unet, p.immunize.inner_params)
    evals = immunize.evaluation_batches(concepts, prior, p.immunize, alphas.shape[0], p.seed)
    start = {n: q.detach().clone() for n, q in pipe.unet.named_parameters()}
    before = immunize.evaluate_objective(pipe.unet, {}, start, inner_names, evals, alphas, p.immunize, ctx)
    if threat not in start_tables:  # the starting model's utility depends on the sampling only
        start_tables[threat] = metrics.shape_presence_table(pipe, the_judge, others, p.world.colors, p.sampling)["presence"]
    # 2. immunize and apply the delta
    result = immunize.immunize(method, pipe.unet, concepts, prior, alphas, p.immunize, ctx, p.seed)
    immunize.apply_delta(pipe.unet, immunize.changed_tensors(pipe.unet, result.theta))
    # 3. the same measurements at the immunized weights
    after = immunize.evaluate_objective(pipe.unet, {}, {n: q.detach() for n, q in pipe.unet.named_parameters()}, inner_names, evals, alphas, p.immunize, ctx)
    presence = metrics.shape_presence_table(pipe, the_judge, others, p.world.colors, p.sampling)["presence"]
    start_presence = start_tables[threat]
    row = {
        "concept_loss_start": round(before["concept_loss"], 4), "concept_loss_end": round(after["concept_loss"], 4),
        "concept_ratio": round(after["concept_loss"] / before["concept_loss"], 2),
        "utility_loss_start": round(before["utility_loss"], 4), "utility_loss_end": round(after["utility_loss"], 4),
        "utility_ratio": round(after["utility_loss"] / before["utility_loss"], 3),
        "utility_presence": round(sum(presence.values()) / len(presence), 3),
        "start_utility_presence": round(sum(start_presence.values()) / len(start_presence), 3),
    }
    row["utility_drop"] = round(row["start_utility_presence"] - row["utility_presence"], 3)
    row.update({f"presence_{s}": round(presence[s], 3) for s in others})
    row["meets_targets"] = (row["concept_ratio"] >= TARGETS["concept_ratio"] and row["utility_ratio"] <= TARGETS["utility_ratio"]
                            and row["utility_drop"] <= TARGETS["utility_drop"])
    row.update({"steps": len(result.log["step"]), "immunize_seconds": round(result.seconds, 1)})
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("configs", type=Path, help="YAML list of configurations (benchmarks/study.py's format)")
    ap.add_argument("--params", type=Path, default=ROOT.parent / "params.yaml")
    ap.add_argument("--out", type=Path, default=ROOT.parent / "reports" / "research" / "immunize_targets.csv")
    ap.add_argument("--only", nargs="*", help="run only these configuration names")
    args = ap.parse_args()
    entries = [e for e in read_configs(args.configs) if not args.only or e["name"] in args.only]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    start_tables: dict = {}
    cols = ("name", "concept_ratio", "utility_ratio", "utility_drop", "utility_presence", "meets_targets", "immunize_seconds")
    print(" | ".join(cols), flush=True)
    for entry in entries:
        if entry["name"] in done_names(args.out):
            print(f"skip {entry['name']} (already in {args.out})", flush=True)
            continue
        threat, method = entry.get("threat", "relearn"), entry.get("method", "mima")
        p = for_threat(load_params(args.params, None, entry.get("overrides", {})), threat)
        torch.set_num_threads(p.threads)
        row = {"name": entry["name"], "threat": threat, "method": method, "overrides": json.dumps(entry.get("overrides", {}), sort_keys=True),
               **measure(p, threat, method, start_tables)}
        append_row(args.out, row)
        print(" | ".join(str(row[c]) for c in cols), flush=True)


if __name__ == "__main__":
    main()
