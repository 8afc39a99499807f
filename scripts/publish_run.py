"""Keep one run's results under reports/published/<name>/ (committed with git), so that a profile
other than the default, run once, can be cited by the README while `dvc repro` keeps reports/
on the default profile: the generated tables, the metrics, the result figures and `run.json`
(the parameters the run used, the profile overlay it selected, the git revision, and each stage's
papermill start, end and seconds). `make full` runs it after the full profile's `dvc exp run`.

    python scripts/publish_run.py full
    python scripts/publish_run.py wikiart --stages data_prep erase immunize@relearn attack_relearn
    python scripts/publish_run.py full_session14 --stages attack_personalize --profile full

Without ``--stages`` it publishes the whole pipeline's results (tables, metrics, the figures
stage's figures). With ``--stages`` (a run of part of the chain, such as the wikiart profile's
`dvc exp run -S profile=wikiart attack_relearn`) it publishes only what those stages declare in
dvc.yaml, so results the run did not produce (the default profile's, still in reports/) are left
out: their metrics, their plots' CSVs and the PNGs under reports/figures/ among their outputs
(named by their path there, `/` -> `_`), and their executed notebooks' times.

The folder is written under a temporary name and renamed when complete."""

import argparse
import json
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from mci_lib import artifacts, metrics, viz  # noqa: E402
from mci_lib.config import resolve_profile  # noqa: E402
PARTS = {"tables": ("reports/tables", "*"), "metrics": ("reports/metrics", "*.json"), "figures": ("reports/figures/results", "*.png")}
FIGURES = "reports/figures"


def stage_times(notebooks: list[Path]) -> dict[str, dict]:
    """Papermill's own record of every executed notebook in ``notebooks``: start, end, seconds."""
    times = {}
    for path in sorted(notebooks):
        meta = json.loads(path.read_text()).get("metadata", {}).get("papermill", {})
        if meta.get("duration") is not None:
            times[path.stem] = {"start": meta["start_time"], "end": meta["end_time"], "seconds": round(meta["duration"], 1)}
    return times


def _paths(entries) -> list[str]:
    """The paths of a dvc.yaml outs/metrics/plots list (each a string or a one-key mapping)."""
    return [next(iter(e)) if isinstance(e, dict) else e for e in entries or []]


def stage_outputs(dvc_yaml: Path, stages: list[str]) -> dict[str, list[str]]:
    """What ``stages`` (names as `dvc repro` takes them, ``immunize@relearn`` for a foreach item)
    declare in ``dvc_yaml``: their outs, metrics and plots, with ``${item}`` filled in."""
    declared = yaml.safe_load(dvc_yaml.read_text())["stages"]
    found = {"outs": [], "metrics": [], "plots": []}
    for stage in stages:
        name, _, item = stage.partition("@")
        if name not in declared:
            raise SystemExit(f"{dvc_yaml}: no stage {name!r} (stages: {', '.join(declared)})")
        body = declared[name]
        if "foreach" in body:
            if item not in body["foreach"]:
                raise SystemExit(f"{dvc_yaml}: stage {name!r} runs once per item of {body['foreach']}; name one, as {name}@{body['foreach'][0]}")
            body = body["do"]
        for key in found:
            found[key] += [p.replace("${item}", item) for p in _paths(body.get(key))]
    return found


def _collect(root: Path, stages: list[str] | None) -> tuple[dict[str, list[tuple[Path, str]]], list[Path]]:
    """(part -> [(source file, published name)], executed notebooks) for the whole run or ``stages``."""
    if not stages:
        parts = {}
        for part, (source, pattern) in PARTS.items():
            files = sorted((root / source).glob(pattern))
            if not files:
                raise SystemExit(f"{root / source}: no {pattern} to publish; run the pipeline (`dvc repro` or `make full`) first")
            parts[part] = [(f, f.name) for f in files]
        return parts, sorted((root / "reports" / "notebooks").glob("*.ipynb"))
    found = stage_outputs(root / "dvc.yaml", stages)
    missing = [p for p in found["metrics"] + found["outs"] if not (root / p).exists()]
    if missing:
        raise SystemExit(f"{', '.join(missing)}: not there; run those stages (`dvc exp run ...`) first")
    figures = []
    for out in found["outs"]:
        path = root / out
        if out.startswith(FIGURES + "/"):
            pngs = sorted(path.rglob("*.png")) if path.is_dir() else [path] if path.suffix == ".png" else []
            figures += [(f, "_".join(f.relative_to(root / FIGURES).parts)) for f in pngs]
    parts = {
        "metrics": [(root / p, Path(p).name) for p in found["metrics"]],
        "plots": [(root / p, Path(p).name) for p in found["plots"] if (root / p).is_file()],
        "figures": figures,
    }
    notebooks = [root / p for p in found["outs"] if p.endswith(".ipynb")]
    return {k: v for k, v in parts.items() if v}, notebooks


def _span(times: dict[str, dict]) -> dict | None:
    """From the first stage's start to the last one's end: the stages' wall time with DVC's work
    between them (stages run one after another), without DVC's start before the first."""
    if not times:
        return None
    start, end = min(t["start"] for t in times.values()), max(t["end"] for t in times.values())
    return {"start": start, "end": end, "seconds": round((datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds(), 1)}


def publish(root: Path, name: str, stages: list[str] | None = None, profile: str | None = None) -> Path:
    """Copy ``root``'s current results (all, or those of ``stages``) into
    ``root/reports/published/<name>/``; return that folder. ``profile`` names the profile the run
    selected when it was not params.yaml's (a notebook run with papermill's ``-p profile full``).
    A partial run that includes an attack stage also gets its MSGR table, ``tables/msgr.md``, built
    from its metrics as the figures stage builds the whole run's."""
    parts, notebooks = _collect(root, stages)
    revision = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    params = yaml.safe_load((root / "params.yaml").read_text())
    profile = profile or (params.get("profile") if isinstance(params, dict) else None)
    # the keys the selected profile overlays on params.yaml (none for the default, "tiny"), read
    # before anything is copied: a missing overlay fails here, naming the file
    overlay = yaml.safe_load(resolve_profile(root / "params.yaml", profile).read_text()) if profile and profile != "tiny" else None
    target = root / "reports" / "published" / name
    tmp = target.with_name(f".{name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for part, files in parts.items():
        (tmp / part).mkdir(parents=True)
        for path, published in files:
            shutil.copy2(path, tmp / part / published)
    attacks = {f.stem.removeprefix("attack_"): artifacts.read_json(f) for f, _ in parts.get("metrics", []) if f.stem.startswith("attack_")}
    if stages and attacks:
        (tmp / "tables").mkdir()
        (tmp / "tables" / "msgr.md").write_text(viz.markdown_table(metrics.msgr_table(attacks), metrics.MSGR_COLUMNS))
    times = stage_times(notebooks)
    run = {
        "name": name,
        "git_revision": revision or None,
        "stages_published": stages or "all",
        "profile_name": profile or "tiny",
        "params": params,
        "profile": overlay,
        "stages": times,
        "span": _span(times),
    }
    (tmp / "run.json").write_text(json.dumps(run, indent=2) + "\n")
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return target


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Keep one run's results under reports/published/NAME/.")
    parser.add_argument("name", help="letters, digits, - and _")
    parser.add_argument("--stages", nargs="+", help="publish only these stages' declared results (e.g. data_prep erase immunize@relearn attack_relearn)")
    parser.add_argument("--profile", help="the profile the run selected, where it is not params.yaml's (a notebook run with `-p profile full`)")
    args = parser.parse_args()
    if not args.name.replace("-", "").replace("_", "").isalnum():
        parser.error("NAME: letters, digits, - and _ only")
    print("published:", publish(ROOT, args.name, args.stages, args.profile).relative_to(ROOT))
