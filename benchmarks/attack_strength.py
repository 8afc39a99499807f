"""Is each attack real? (DESIGN section 7; the attack issue's check, before any immunization.)

Runs attacks of one threat against the model *without* immunization (the erased model for
re-learning, the base model for personalization), on every attack seed, and prints per attack the
final presence of each target concept (mean over seeds, and per seed) next to the bar the attack
stages hold it to: 0.7 x the base model's presence (re-learning) or 0.6 (personalization). An
attack below its bar makes any immunization look good; this is the script to tune its budget with.

Each ``--set`` is one candidate budget: dotted overrides of ``params.yaml`` applied on top of
``--profile`` (JSON values), for example ``--set attack.lr.dreambooth=3e-4 attack.steps=400``.
Without ``--set`` the params' own budget is measured. It needs the pipeline's toy world, base,
erased and judge models at the params' paths (``dvc repro erase``).

    python benchmarks/attack_strength.py relearn --kinds full lora --profile full \\
        [--set attack.loss_weighting='"none"'] [--set ...] [--out reports/research/attack_strength.json]

Prints a table and appends one JSON record per (candidate, attack) to ``--out`` (its settings,
the final presence per concept and seed, the presence curve over checkpoints, the bar, ``real``
and seconds).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mci_lib import attacks, data, judge, metrics, models  # noqa: E402
from mci_lib.artifacts import read_json, write_json  # noqa: E402
from mci_lib.config import load_params  # noqa: E402

START = {"relearn": "erased", "personalize": "base"}
PERSONAL_BAR = 0.6  # the personalization attacks' bar (the attack issue)
RELEARN_SHARE = 0.7  # re-learning: this share of the base model's presence


def parse_set(items: list[str]) -> dict:
    """``key=value`` pairs as dotted overrides; a value is JSON where it parses, else a string."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected key=value (for example attack.lr.dreambooth=3e-4)")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def real_bar(p, threat: str, judge_model, evals, sampling) -> dict[str, float]:
    """The presence each concept must reach on the model without immunization."""
    if threat == "personalize":
        return {e.name: PERSONAL_BAR for e in evals}
    base = models.load_pipeline(Path(p.paths.models_dir) / "base")
    seeds = [p.sampling.seed + i for i in range(p.sampling.samples_per_concept)]
    return {e.name: RELEARN_SHARE * metrics.concept_scores(base, judge_model, e.prompts, e.name, e.reference_features, sampling, seeds)["presence"] for e in evals}


def measure(p, threat: str, kinds: list[str], bar: dict | None = None) -> tuple[list[dict], dict]:
    """Every attack in ``kinds`` at the params' default budget on every attack seed against the
    threat's starting model; one record per attack with the final presence per concept and seed."""
    models_dir = Path(p.paths.models_dir)
    judge_model = judge.load_judge(models_dir / "judge")
    records = data.read_index(p.paths.data_dir)
    targets = list(getattr(p, threat).targets)
    sampling = replace(p.sampling, num_inference_steps=p.attack.num_inference_steps)
    concepts = attacks.toy_attack_data(p.paths.data_dir, records, p.world, targets)
    evals = attacks.toy_eval_concepts(judge_model, p.paths.data_dir, records, p.world, targets, p.sampling.samples_per_concept)
    bar = bar or real_bar(p, threat, judge_model, evals, sampling)
    out = []
    for kind in kinds:
        t0 = time.time()
        rows, _ = attacks.run_suite([kind], {"none": models_dir / START[threat]}, concepts, evals, judge_model, p.attack, sampling, p.attack.seeds, progress=False)
        last = max(r["step"] for r in rows)
        final = {c: {r["seed"]: r["presence"] for r in rows if r["step"] == last and r["concept"] == c} for c in targets}
        mean = {c: float(np.mean(list(v.values()))) for c, v in final.items()}
        budget = attacks.default_budget(kind, p.attack)
        out.append({
            "threat": threat, "attack": kind, "lr": budget.lr, "steps": budget.steps, "lora_rank": budget.lora_rank,
            "batch_size": p.attack.batch_size, "loss_weighting": p.attack.loss_weighting, "seeds": list(p.attack.seeds),
            "samples_per_checkpoint": p.sampling.samples_per_concept,
            "final_presence": mean, "final_presence_per_seed": final,
            "curve": {c: {int(s): float(np.mean([r["presence"] for r in rows if r["step"] == s and r["concept"] == c])) for s in sorted({r["step"] for r in rows})} for c in targets},
            "bar": bar, "real": all(mean[c] >= bar[c] for c in targets), "seconds": round(time.time() - t0, 1),
        })
    return out, bar


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("threat", choices=sorted(START))
    ap.add_argument("--kinds", nargs="+", help="attacks to measure (default: the threat's attacks in the params)")
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--profile", default=None, help="profile overlay (profiles/<name>.yaml); default: the params' own")
    ap.add_argument("--set", dest="sets", nargs="+", action="append", default=[], metavar="KEY=VALUE", help="one candidate budget (repeat for more)")
    ap.add_argument("--base-overrides", type=json.loads, default={}, help="JSON of dotted overrides under every candidate (e.g. micro sizes, paths)")
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "research" / "attack_strength.json")
    args = ap.parse_args()
    candidates = [parse_set(s) for s in args.sets] or [{}]
    records, bar = [], None
    for overrides in candidates:
        p = load_params(args.params, args.profile, {**args.base_overrides, **overrides})
        torch.set_num_threads(p.threads)
        kinds = args.kinds or list(getattr(p.attack, args.threat))
        found, bar = measure(p, args.threat, kinds, bar)
        for r in found:
            r["overrides"] = overrides
            records.append(r)
            seeds = " ".join(f"{c}: " + "/".join(f"{v:.2f}" for v in r["final_presence_per_seed"][c].values()) for c in r["final_presence"])
            print(f"{r['attack']:<18} lr {r['lr']:<8g} steps {r['steps']:<4} batch {r['batch_size']:<2} {r['loss_weighting']:<8} "
                  f"final {' '.join(f'{c} {v:.3f}' for c, v in r['final_presence'].items())}  (per seed {seeds})  "
                  f"bar {' '.join(f'{v:.2f}' for v in r['bar'].values())}  {'real' if r['real'] else 'NOT REAL'}  {r['seconds']:.0f} s  {overrides or ''}", flush=True)
    previous = read_json(args.out) if args.out.is_file() else []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, previous + records)


if __name__ == "__main__":
    main()
