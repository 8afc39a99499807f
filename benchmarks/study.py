"""The immunization study (research issue; DESIGN sections 6 and 7): train one immunization
configuration, attack it with the threat's attacks at their default budgets on every attack seed,
and write one row per configuration to ``reports/research/study.csv``.

A configuration is a name, a ``method`` (mima, imma_joint, imma_sequential), a ``threat``
(relearn, personalize) and dotted ``overrides`` of ``params.yaml`` (``immunize.*`` levers, or
``attack.*`` to change the attacks scored). ``immunize_targets`` (a subset of the threat's
targets) immunizes against those alone while every target is still attacked: the others are then
controls, attacked on a model that was never immunized against them. It needs the pipeline's
outputs (the toy world, the base, erased and judge models at the params' paths): run ``dvc repro
immunize`` first.

Each row: the settings, per attack the MSGR on presence (mean over seeds, its standard deviation
across seeds and the verdict of :func:`mci_lib.metrics.msgr_verdict`) and on similarity, the
steps-to-relearn ratio, the final presence with and without immunization, then utility presence of
the non-target shapes and the Frechet distance of their judge features to the starting model's,
and seconds. The rows of the model without immunization are computed once per threat and attack
settings and cached beside the CSV; each configuration's scored attack rows (per seed, checkpoint
and concept) go to ``curves/<name>.json`` beside it. Rows already in the CSV are skipped, so an
interrupted study resumes where it stopped.

    python benchmarks/study.py benchmarks/study_configs.yaml [--only NAME ...] [--out reports/research/study.csv]
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mci_lib import attacks, data, immunize, judge, metrics, models, pretrain  # noqa: E402
from mci_lib.artifacts import atomic_file, read_json, tree_hash, write_json  # noqa: E402
from mci_lib.config import Params, for_threat, load_params, params_to_dict  # noqa: E402

START = {"relearn": "erased", "personalize": "base"}


def read_configs(path: Path) -> list[dict]:
    """The study's configurations; each needs a unique ``name``."""
    entries = yaml.safe_load(path.read_text()) or []
    if not isinstance(entries, list):
        raise SystemExit(f"{path}: expected a list of configurations, each with a name")
    names = [e.get("name") for e in entries]
    if None in names or len(set(names)) != len(names):
        raise SystemExit(f"{path}: every configuration needs a unique name (got {names})")
    for e in entries:
        unknown = set(e) - {"name", "method", "threat", "overrides", "note", "immunize_targets"}
        if unknown:
            raise SystemExit(f"{path}: configuration {e['name']!r} has unknown keys {sorted(unknown)}")
        if not isinstance(e.get("immunize_targets", []), list):
            raise SystemExit(f"{path}: configuration {e['name']!r}: immunize_targets is a list of the threat's targets")
    return entries


def done_names(out: Path) -> set[str]:
    if not out.is_file():
        return set()
    with out.open() as f:
        return {row["name"] for row in csv.DictReader(f)}


def append_row(out: Path, row: dict) -> None:
    """Append ``row``; the file is rewritten through a temporary name, so a kill loses nothing."""
    rows = []
    if out.is_file():
        with out.open() as f:
            rows = list(csv.DictReader(f))
    rows.append({k: str(v) for k, v in row.items()})
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with atomic_file(out) as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)


class Study:
    """What every configuration of one threat shares: the judge, the data, the scoring inputs, the
    start model's utility features and the attack rows of the model without immunization."""

    def __init__(self, p: Params, threat: str, cache_dir: Path):
        self.p, self.threat = p, threat
        self.models_dir = Path(p.paths.models_dir)
        self.start_dir = self.models_dir / START[threat]
        self.targets = list(getattr(p, threat).targets)
        self.others = [s for s in p.world.shapes if s not in self.targets]
        self.judge = judge.load_judge(self.models_dir / "judge")
        self.records = data.read_index(p.paths.data_dir)
        self.sampling = replace(p.sampling, num_inference_steps=p.attack.num_inference_steps)
        self.attack_data = attacks.toy_attack_data(p.paths.data_dir, self.records, p.world, self.targets)
        self.evals = attacks.toy_eval_concepts(self.judge, p.paths.data_dir, self.records, p.world, self.targets, p.sampling.samples_per_concept)
        self.kinds = list(getattr(p.attack, threat))
        start = models.load_pipeline(self.start_dir)
        self.start_utility = self.utility(start)
        self.bar = self.base_bar()
        self.baseline_rows = self.baseline(cache_dir)

    def utility(self, pipe) -> dict:
        s = replace(self.sampling, samples_per_concept=self.p.attack.utility_samples)
        return metrics.shape_presence_table(pipe, self.judge, self.others, self.p.world.colors, s)

    def base_bar(self) -> dict:
        """steps_to_relearn's bar: the base model's presence (re-learning); 1.0 for personal
        subjects the base model never learned."""
        if self.threat != "relearn":
            return {c: 1.0 for c in self.targets}
        base = models.load_pipeline(self.models_dir / "base")
        seeds = [self.p.sampling.seed + i for i in range(self.p.sampling.samples_per_concept)]
        return {e.name: metrics.concept_scores(base, self.judge, e.prompts, e.name, e.reference_features, self.sampling, seeds)["presence"] for e in self.evals}

    def baseline(self, cache_dir: Path) -> list[dict]:
        """The attack rows of the model without immunization, cached by threat, attack settings and
        the starting model's UNet weights (a retrained base model is a new baseline)."""
        key = json.dumps({"threat": self.threat, "attack": params_to_dict(self.p)["attack"], "sampling": params_to_dict(self.p)["sampling"],
                          "start": str(self.start_dir), "start_unet": tree_hash(self.start_dir / "unet")}, sort_keys=True)
        path = cache_dir / f"baseline_{self.threat}_{hashlib.sha256(key.encode()).hexdigest()[:12]}.json"
        if path.is_file():
            return read_json(path)
        rows, _ = attacks.run_suite(self.kinds, {"none": self.start_dir}, self.attack_data, self.evals, self.judge, self.p.attack, self.sampling, self.p.attack.seeds)
        write_json(path, rows)
        return rows

    def run(self, entry: dict) -> dict:
        """Immunize with one configuration, attack the result, and return its study row."""
        p, method = self.p, entry.get("method", "mima")
        targets = entry.get("immunize_targets", self.targets)
        if not targets or set(targets) - set(self.targets):
            raise SystemExit(f"configuration {entry['name']!r}: immunize_targets {targets} must be a non-empty subset of the threat's targets {self.targets}")
        t0 = time.time()
        # 1. immunize the start model with this configuration
        pipe = models.load_pipeline(self.start_dir)
        vae_latents = lambda images: pretrain.encode_latents(pipe.vae, images)  # noqa: E731
        concepts, prior = immunize.toy_threat_concepts(pipe, p.paths.data_dir, self.records, p.world, targets, vae_latents, prior_size=256, seed=p.seed, utility_uncond=p.immunize.utility_uncond, merge_rows=p.immunize.merge_rows)
        reg = data.regularization_captions(p.world, p.immunize.reg_captions, p.seed, exclude=self.targets)
        ctx = immunize.merge_context(pipe, concepts, reg, p.immunize)
        alphas = pipe.scheduler.alphas_cumprod.float()
        result = immunize.immunize(method, pipe.unet, concepts, prior, alphas, p.immunize, ctx, p.seed)
        immunize.apply_delta(pipe.unet, immunize.changed_tensors(pipe.unet, result.theta))
        # 2. utility before any attack
        table = self.utility(pipe)
        start_features = torch.cat([self.start_utility["features"][s] for s in self.others])
        with tempfile.TemporaryDirectory() as tmp:
            folder = models.save_pipeline(pipe, Path(tmp) / "immunized")
            # 3. every attack of the threat, every seed, scored like the pipeline's attack stage
            rows, _ = attacks.run_suite(self.kinds, {method: folder}, self.attack_data, self.evals, self.judge, p.attack, self.sampling, p.attack.seeds)
        self.last_rows = rows
        summary = metrics.attack_summary(self.baseline_rows + rows, self.bar, p.attack.steps)
        settings = {**entry.get("overrides", {}), **({"immunize_targets": targets} if targets != self.targets else {})}
        row = {"name": entry["name"], "threat": self.threat, "method": method, "overrides": json.dumps(settings, sort_keys=True)}
        for kind in self.kinds:
            e = summary[kind][method]
            row.update({
                f"msgr_{kind}": round(e["msgr_presence"], 2),
                f"msgr_std_{kind}": round(e["msgr_presence_std"], 2),
                f"verdict_{kind}": e["verdict"],
                f"msgr_sim_{kind}": round(e["msgr_sim"], 2),
                f"steps_ratio_{kind}": round(sum(v["ratio"] for v in e["steps_to_relearn"].values()) / len(e["steps_to_relearn"]), 3),
                f"final_presence_{kind}": round(e["final_presence"], 3),
                f"final_presence_without_{kind}": round(e["final_presence_without"], 3),
            })
        row.update({
            "utility_presence": round(sum(table["presence"].values()) / len(self.others), 3),
            "start_utility_presence": round(sum(self.start_utility["presence"].values()) / len(self.others), 3),
            "utility_frechet": round(metrics.frechet_distance(torch.cat([table["features"][s] for s in self.others]), start_features), 3),
            "concept_loss_end": round(result.log["concept_loss"][-1], 4),
            "immunize_seconds": round(result.seconds, 1),
            "seconds": round(time.time() - t0, 1),
            "seeds": len(p.attack.seeds),
            "samples_per_checkpoint": p.sampling.samples_per_concept,
        })
        return row


# The study's base: params.yaml's immunize settings of sessions 19-21, under which every row of
# study.csv ran, pinned so that the rows stay reproducible now that params.yaml's re-learning
# defaults are the study's best row (a row's overrides are relative to this base)
STUDY_DEFAULTS = {
    "attack.seeds": [0, 1],
    "immunize.steps": {"relearn": 90, "personalize": 60},
    "immunize.inner_params": "kv",
    "immunize.outer_params": "cross_attn",
    "immunize.utility_weight": 25.0,
    # session 26 set the personalization attacker apart in params.yaml (Adam-like at 3e-3)
    "immunize.inner_update": "sgd",
    "immunize.inner_lr": 0.01,
    # session 27 runs re-learning's outer steps in bfloat16 in params.yaml
    "immunize.mixed_precision": "fp32",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("configs", type=Path, help="YAML list of configurations")
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "research" / "study.csv")
    ap.add_argument("--only", nargs="*", help="run only these configuration names")
    ap.add_argument("--base-overrides", type=json.loads, default={}, help="JSON of dotted overrides applied to every configuration (e.g. micro sizes)")
    args = ap.parse_args()
    entries = read_configs(args.configs)
    if args.only:
        entries = [e for e in entries if e["name"] in args.only]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    studies: dict = {}
    for entry in entries:
        if entry["name"] in done_names(args.out):
            print(f"skip {entry['name']} (already in {args.out})", flush=True)
            continue
        # every row is scored on 2 attack seeds unless the base overrides say otherwise (the default
        # pipeline profile runs one)
        threat = entry.get("threat", "relearn")
        p = for_threat(load_params(args.params, None, {**STUDY_DEFAULTS, **args.base_overrides, **entry.get("overrides", {})}), threat)
        torch.set_num_threads(p.threads)
        # the shared inputs depend only on what the attacks and scoring read, not on immunize.*
        key = (threat, json.dumps({k: v for k, v in params_to_dict(p).items() if k != "immunize"}, sort_keys=True))
        if key not in studies:
            studies[key] = Study(p, threat, args.out.parent)
        study = studies[key]
        study.p = p
        print(f"== {entry['name']}: {entry.get('method', 'mima')} on {threat}, {entry.get('overrides', {})}", flush=True)
        row = study.run(entry)
        # the scored attack rows (presence and sim per seed, checkpoint and concept), for curves
        curves = args.out.parent / "curves"
        curves.mkdir(exist_ok=True)
        write_json(curves / f"{entry['name']}.json", {"rows": study.last_rows, "baseline": study.baseline_rows})
        append_row(args.out, row)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
