"""Keep one run's results under reports/published/<name>/ (committed with git), so that a profile
other than the default, run once, can be cited by the README while `dvc repro` keeps reports/
on the default profile: the generated tables, the metrics, the result figures and `run.json`
(the parameters the run used, the git revision, and each stage's papermill start, end and
seconds). `make full` runs it after the full profile's `dvc exp run`.

    python scripts/publish_run.py full

The folder is written under a temporary name and renamed when complete."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PARTS = {"tables": ("reports/tables", "*"), "metrics": ("reports/metrics", "*.json"), "figures": ("reports/figures/results", "*.png")}


def stage_times(notebooks: Path) -> dict[str, dict]:
    """Papermill's own record of every executed notebook in ``notebooks``: start, end, seconds."""
    times = {}
    for path in sorted(notebooks.glob("*.ipynb")):
        meta = json.loads(path.read_text()).get("metadata", {}).get("papermill", {})
        if meta.get("duration") is not None:
            times[path.stem] = {"start": meta["start_time"], "end": meta["end_time"], "seconds": round(meta["duration"], 1)}
    return times


def publish(root: Path, name: str) -> Path:
    """Copy ``root``'s current results into ``root/reports/published/<name>/``; return that folder."""
    target = root / "reports" / "published" / name
    tmp = target.with_name(f".{name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for part, (source, pattern) in PARTS.items():
        files = sorted((root / source).glob(pattern))
        if not files:
            raise SystemExit(f"{root / source}: no {pattern} to publish; run the pipeline (`dvc repro` or `make full`) first")
        (tmp / part).mkdir(parents=True)
        for path in files:
            shutil.copy2(path, tmp / part / path.name)
    revision = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    run = {
        "name": name,
        "git_revision": revision or None,
        "params": yaml.safe_load((root / "params.yaml").read_text()),
        "stages": stage_times(root / "reports" / "notebooks"),
    }
    (tmp / "run.json").write_text(json.dumps(run, indent=2) + "\n")
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return target


if __name__ == "__main__":
    if len(sys.argv) != 2 or not sys.argv[1].replace("-", "").replace("_", "").isalnum():
        raise SystemExit("usage: python scripts/publish_run.py NAME   (letters, digits, - and _)")
    print("published:", publish(ROOT, sys.argv[1]).relative_to(ROOT))
