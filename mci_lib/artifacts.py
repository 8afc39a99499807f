"""Artifacts: atomic writes, metrics JSON, safetensors weights and run manifests (DESIGN section 8).

Every write goes to a temporary name beside the target and is renamed when complete, so a crash
or a bad input never leaves a partial output behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save_file


def _writable_parent(target: Path) -> None:
    """Create ``target``'s folder, or fail at once naming it when it cannot be written."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PermissionError(f"{target}: cannot create the output folder {target.parent} ({err.strerror}). Choose a writable output path.") from err
    if not os.access(target.parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{target}: the output folder {target.parent} is not writable. Choose a writable output path.")


def _previous(target: Path) -> Path:
    return target.parent / f".{target.name}.old"


def recover_dir(target: str | Path) -> Path:
    """Finish a replacement of :func:`atomic_dir` that a kill interrupted: if ``target`` is gone but
    its previous version is still parked beside it, put that back. Returns ``target``."""
    target = Path(target)
    previous = _previous(target)
    if previous.is_dir() and not target.exists():
        os.replace(previous, target)
    return target


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; on success it replaces ``target``.

    The old ``target`` is parked under a hidden name (one rename), the new one renamed into place,
    then the old one deleted: a kill at any moment leaves either the old or the new folder whole,
    and :func:`recover_dir` puts the old one back if the kill fell between the two renames."""
    target = recover_dir(target)
    _writable_parent(target)
    previous = _previous(target)
    shutil.rmtree(previous, ignore_errors=True)  # a leftover of a kill after the swap
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            os.replace(target, previous)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(previous, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(target: str | Path, mode: str = "w") -> Iterator[Any]:
    """Open a temporary file beside ``target``; on success it is renamed to ``target``."""
    target = Path(target)
    _writable_parent(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _strict(value: Any) -> Any:
    """``value`` with every nan or +-inf float (anywhere in dicts, lists and tuples) as None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def write_json(path: str | Path, data: Any) -> Path:
    """``data`` as indented JSON with sorted keys. A nan or +-inf float (an undefined number, such as
    the spread of a single seed) is written as null: Python's ``NaN`` is not JSON, and DVC, jq and
    JavaScript reject it."""
    with atomic_file(path) as fh:
        json.dump(_strict(data), fh, indent=2, sort_keys=True, allow_nan=False)
        fh.write("\n")
    return Path(path)


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


def save_weights(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Save tensors as safetensors (atomically)."""
    path = Path(path)
    _writable_parent(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent, suffix=".safetensors")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file; anything else (a pickle, say) is refused with a clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(f"{path}: not a safetensors file ({err}). Only safetensors weights are loaded; pickles never are.") from err


def file_hash(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def tree_hash(folder: str | Path) -> str:
    """A content hash of every file under ``folder`` (names and bytes), for manifests."""
    folder = Path(folder)
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode())
            h.update(file_hash(p).encode())
    return h.hexdigest()


PACKAGES = ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "numpy", "pillow")


def package_versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def write_manifest(path: str | Path, params: dict, seeds: dict[str, int], inputs: dict[str, str | Path] | None = None, extra: dict | None = None) -> Path:
    """A run manifest: resolved params, seeds, package versions and hashes of the inputs."""
    hashes = {}
    for name, p in (inputs or {}).items():
        p = Path(p)
        hashes[name] = tree_hash(p) if p.is_dir() else file_hash(p) if p.is_file() else "missing"
    manifest = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "params": params,
        "seeds": seeds,
        "versions": package_versions(),
        "inputs": hashes,
    }
    if extra:
        manifest.update(extra)
    return write_json(path, manifest)


def write_csv(path: str | Path, columns: dict[str, list]) -> Path:
    """Write equal-length columns as a CSV (atomically), e.g. a per-step log declared as a DVC plot."""
    import csv

    names = list(columns)
    lengths = {len(v) for v in columns.values()}
    if len(lengths) > 1:
        raise ValueError(f"{path}: columns have different lengths {sorted(lengths)}")
    with atomic_file(path, "w") as fh:
        writer = csv.writer(fh)
        writer.writerow(names)
        writer.writerows(zip(*columns.values()))
    return Path(path)


def read_csv(path: str | Path) -> dict[str, list[float]]:
    """Read a numeric CSV written by :func:`write_csv` back into columns."""
    import csv

    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise ValueError(f"{path}: no rows")
    return {k: [float(r[k]) for r in rows] for k in rows[0]}


def save_training_state(folder: str | Path, step: int, tensors: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                        generators: dict[str, torch.Generator], extra: dict | None = None) -> Path:
    """A resumable checkpoint (DESIGN section 8): the trained tensors, the optimizer's state, the
    RNG states of ``generators`` and of torch, and the ``step`` just completed, as
    ``state.safetensors`` plus ``state.json``; written to a temporary folder and renamed, so a
    kill at any moment leaves the previous checkpoint whole."""
    opt = optimizer.state_dict()
    flat = {f"param.{n}": v for n, v in tensors.items()}
    for idx, state in opt["state"].items():
        for key, value in state.items():
            flat[f"opt.{idx}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    for name, g in generators.items():
        flat[f"rng.{name}"] = g.get_state()
    flat["rng.torch"] = torch.get_rng_state()
    meta = {"step": step, "param_groups": opt["param_groups"], "generators": sorted(generators), "extra": extra or {}}
    with atomic_dir(folder) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in flat.items()}, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return Path(folder)


def checkpoint_step(folder: str | Path) -> int | None:
    """The step a resumable checkpoint in ``folder`` completed, or None when there is none (after
    :func:`recover_dir`, so a checkpoint swap cut short by a kill still counts)."""
    state = recover_dir(folder) / "state.json"
    return int(read_json(state)["step"]) if state.is_file() else None


def load_training_state(folder: str | Path, tensors: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                        generators: dict[str, torch.Generator]) -> tuple[int, dict]:
    """Restore a checkpoint of :func:`save_training_state` in place: copy the trained tensors into
    ``tensors``, load the optimizer state and every RNG state. Returns ``(step, extra)``. A
    checkpoint that does not match (other tensors, other shapes, other generators) is an error
    naming the file."""
    folder = recover_dir(folder)
    path = folder / "state.safetensors"
    meta = read_json(folder / "state.json")
    flat = load_weights(path)
    names = {k[len("param."):] for k in flat if k.startswith("param.")}
    if names != set(tensors):
        missing, unknown = sorted(set(tensors) - names), sorted(names - set(tensors))
        raise ValueError(f"{path}: checkpoint tensors do not match this run (missing {missing[:3]}, unexpected {unknown[:3]}); "
                         "delete the checkpoint folder to start afresh or run with the params that wrote it")
    if sorted(generators) != meta["generators"]:
        raise ValueError(f"{path}: checkpoint RNGs {meta['generators']} do not match this run's {sorted(generators)}")
    with torch.no_grad():
        for n, v in tensors.items():
            saved = flat[f"param.{n}"]
            if saved.shape != v.shape:
                raise ValueError(f"{path}: tensor {n!r} has shape {tuple(saved.shape)}, this run's is {tuple(v.shape)}")
            v.copy_(saved)
    state: dict = {}
    for key, value in flat.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    for name, g in generators.items():
        g.set_state(flat[f"rng.{name}"])
    torch.set_rng_state(flat["rng.torch"])
    return int(meta["step"]), meta["extra"]


def read_csv_rows(path: str | Path) -> list[dict]:
    """Read a CSV written by :func:`write_csv` as one dict per row, numbers as floats (integers
    as ints) and other cells as strings; an empty file gives no rows."""
    import csv

    def parse(cell: str):
        for kind in (int, float):
            try:
                return kind(cell)
            except ValueError:
                pass
        return cell

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; run the stage that writes it first (see dvc.yaml)")
    with open(path, newline="") as fh:
        return [{k: parse(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def write_text(path: str | Path, text: str) -> Path:
    """Write a text file atomically (a Markdown table, a model card)."""
    with atomic_file(path, "w") as fh:
        fh.write(text)
    return Path(path)


# ---------------------------------------------------------------------------------------------
# model card and release folder of an immunized model

ATTACK_NOTEBOOKS = {"relearn": "notebooks/03_relearning_attack.ipynb", "personalize": "notebooks/04_personalization_attack.ipynb"}
THREAT_WORDS = {"relearn": "re-learning (fine-tuning an erased model to bring the concepts back)",
                "personalize": "personalization (teaching the model new subjects from a few images)"}


def _number(value: Any, digits: int = 2) -> str:
    """A table cell: ``value`` rounded, ``n/a`` for None or nan."""
    if value is None or (isinstance(value, float) and value != value):
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:.{digits}f}"


def _flatten(settings: dict, prefix: str = "") -> list[tuple[str, Any]]:
    rows = []
    for key in sorted(settings):
        value = settings[key]
        if isinstance(value, dict):
            rows += _flatten(value, f"{prefix}{key}.")
        else:
            rows.append((prefix + key, ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else value))
    return rows


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def model_card(
    method: str,
    threat: str,
    targets: list[str] | tuple[str, ...],
    base_model: str,
    immunize_settings: dict,
    attack_metrics: dict,
    *,
    model_name: str | None = None,
    license: str = "creativeml-openrail-m",
    profile: str = "tiny",
    baseline: str = "none",
    tags: tuple[str, ...] = (),
) -> str:
    """A Hugging Face model card (``README.md``) for a model immunized with ``method`` against
    ``threat`` (``relearn`` or ``personalize``) on ``targets``: YAML front matter (library, base
    model, license, pipeline tag, tags), then the base model, the concepts, the method and its
    settings (``immunize_settings``, e.g. ``params_to_dict(p)["immunize"]``), one row per attack
    from ``attack_metrics`` (the dict of ``reports/metrics/attack_<threat>.json``: MSGR mean +- std
    across seeds, verdict, worst case over the budget sweep, steps-to-relearn ratio, and a flag
    where ``attack_is_real[attack]`` is false, i.e. the attack did not bring the concepts back even
    without immunization, so its MSGR says nothing), utility (``utility_presence`` and
    ``utility_frechet`` beside the model without immunization, ``baseline``) and the commands that
    reproduce it."""
    if not targets:
        raise ValueError("model_card: no target concepts")
    if "msgr" not in attack_metrics:
        raise ValueError(f"model_card: attack_metrics lacks 'msgr'; pass the dict of reports/metrics/attack_{threat}.json")
    name = model_name or f"{base_model.rstrip('/').split('/')[-1]}-{method}-{threat}"
    front = {
        "library_name": "diffusers",
        "base_model": base_model,
        "license": license,
        "pipeline_tag": "text-to-image",
        "tags": list(dict.fromkeys(["immunization", "model-immunization", method.replace("_", "-"), "stable-diffusion",
                                    "text-to-image", "diffusers", threat, *tags])),
    }
    import yaml

    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", ""]
    lines += [
        f"# {name}",
        "",
        f"`{base_model}` immunized with **{method}** against **{THREAT_WORDS.get(threat, threat)}** of "
        f"{len(targets)} concept(s): {', '.join(f'`{t}`' for t in targets)}.",
        "",
        "Model immunization (IMMA, Zheng & Yeh, ECCV 2024; MIMA, Zheng & Yeh, AAAI 2025, arXiv 2412.15320) changes "
        "a model's weights before release so that fine-tuning it on the target concepts is harder, while the model "
        "stays useful for everything else. The tables below say how far that held in this project's measurements; "
        "read them before relying on it. Immunization raises the cost of an attack; it is no guarantee.",
        "",
        "## Base model",
        "",
        f"- base model: `{base_model}`",
        f"- profile: `{profile}`",
        f"- threat model: `{threat}`",
        "",
        "## Concepts immunized against",
        "",
        "| concept | threat |",
        "|---|---|",
        *[f"| {_cell(t)} | {_cell(threat)} |" for t in targets],
        "",
        "## Method and settings",
        "",
        f"Method: `{method}`. Settings (the `immunize` section of the resolved params):",
        "",
        "| setting | value |",
        "|---|---|",
        *[f"| `{_cell(k)}` | {_cell(format(v, 'g') if isinstance(v, float) else v)} |" for k, v in _flatten(immunize_settings)],
        "",
        "## Attacks",
        "",
        "MSGR: the mean similarity gap ratio (percent) of target-concept presence, `100 * (without - with) / without`, "
        "against the same attack, seeds and initial noise on the model without immunization, averaged over the target "
        "concepts and attack checkpoints; positive means the attack brought the concepts back less on this model. "
        "Mean +- standard deviation across attack seeds; the worst case is the attacker's best point of the "
        "budget sweep (learning rate x LoRA rank). An attack marked *not real* did not bring the concepts back even "
        "without immunization, so its MSGR measures nothing.",
        "",
        "| attack | MSGR (mean +- std) | verdict | worst-case MSGR (budget sweep) | steps-to-relearn ratio | attack real? |",
        "|---|---|---|---|---|---|",
    ]
    real = attack_metrics.get("attack_is_real", {})
    no_imm = attack_metrics.get("no_immunization_final_presence", {})
    for attack in sorted(attack_metrics["msgr"]):
        if method not in attack_metrics["msgr"][attack]:
            lines.append(f"| {_cell(attack)} | not measured | | | | |")
            continue
        mean = attack_metrics["msgr"][attack][method]
        std = attack_metrics.get("msgr_std", {}).get(attack, {}).get(method)
        verdict = attack_metrics.get("verdict", {}).get(attack, {}).get(method, "n/a")
        worst = attack_metrics.get("worst_case_msgr", {}).get(attack, {}).get(method)
        ratio = attack_metrics.get("steps_to_relearn_ratio", {}).get(attack, {}).get(method)
        if attack not in real:
            flag = "not checked"
        elif real[attack]:
            flag = "yes"
        else:
            flag = (f"**NO: not a real attack** (without immunization final presence {_number(no_imm.get(attack))}, "
                    "below the bar); this MSGR is not evidence")
        msgr_text = f"{_number(mean)} +- {_number(std)}" + ("" if real.get(attack, True) else " (attack not real)")
        lines.append(f"| {_cell(attack)} | {msgr_text} | {_cell(verdict)} | {_number(worst)} | {_number(ratio)} | {flag} |")
    lines += [
        "",
        "## Utility",
        "",
        "On the non-target concepts: presence (share of samples showing the prompted concept) and the Frechet "
        "distance of feature statistics to the model without immunization (0: identical).",
        "",
        f"| metric | {_cell(method)} | without immunization |",
        "|---|---|---|",
    ]
    up, uf = attack_metrics.get("utility_presence", {}), attack_metrics.get("utility_frechet", {})
    lines.append(f"| utility presence | {_number(up.get(method), 3)} | {_number(up.get(baseline), 3)} |")
    lines.append(f"| utility Frechet distance | {_number(uf.get(method))} | {_number(uf.get(baseline))} |")
    profile_flag = "" if profile == "tiny" else f" -S profile={profile}"
    notebook = ATTACK_NOTEBOOKS.get(threat, "notebooks/03_relearning_attack.ipynb")
    lines += [
        "",
        "## How to reproduce",
        "",
        "From a clone of the project repository (`make setup`; every model is read from a local path, "
        "`HF_HUB_OFFLINE=1`):",
        "",
        "```bash",
        "source .venv/bin/activate",
        ("dvc repro   # the whole pipeline, tiny profile" if profile == "tiny"
         else f"dvc exp run{profile_flag}   # or `dvc repro` with `profile: {profile}` in params.yaml"),
        f"dvc repro immunize@{threat} attack_{threat}   # only this threat's stages",
        "dvc metrics show",
        f"papermill notebooks/02_immunize.ipynb /tmp/02_immunize.ipynb -p threat {threat} -p profile {profile}",
        f"papermill {notebook} /tmp/attack_{threat}.ipynb -p profile {profile}",
        "```",
        "",
        f"The metrics above are `reports/metrics/attack_{threat}.json`; the immunized weights are "
        f"`models/immunized/{threat}/{method}/` (`delta.safetensors` holds only the changed tensors, "
        "`manifest.json` the resolved params, seeds, package versions and input hashes).",
        "",
        "## Loading",
        "",
        "```python",
        "from diffusers import StableDiffusionPipeline",
        'pipe = StableDiffusionPipeline.from_pretrained("path/to/this/folder")',
        "```",
        "",
    ]
    return "\n".join(lines)


RELEASE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
RELEASE_EXTRAS = ("delta.safetensors", "manifest.json")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")


def export_release(model_folder: str | Path, out_folder: str | Path, card_text: str) -> Path:
    """Copy an immunized diffusers folder into ``out_folder`` as a release: ``model_index.json``,
    the pipeline components (``unet``, ``vae``, ``text_encoder``, ``tokenizer``, ``scheduler``),
    ``delta.safetensors`` and ``manifest.json`` when present, and ``README.md`` = ``card_text``.
    Nothing else (logs, checkpoints) is copied, and pickled weight files are refused (a release
    carries safetensors only). Written to a temporary folder and renamed when complete."""
    from .models import check_model_folder

    src = check_model_folder(model_folder)
    if not card_text.startswith("---\n"):
        raise ValueError("export_release: card_text must be a model card with YAML front matter (see model_card)")
    # the five SD components, and any other component model_index.json names (e.g. safety_checker)
    index = read_json(src / "model_index.json")
    parts = list(RELEASE_PARTS) + sorted(
        k for k, v in index.items()
        if not k.startswith("_") and k not in RELEASE_PARTS and isinstance(v, list) and v and v[0] is not None and (src / k).is_dir()
    )
    for part in parts:
        pickles = [p for p in (src / part).rglob("*") if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise ValueError(f"{pickles[0]}: a pickled weights file; a release carries safetensors only. "
                             "Re-save the pipeline with mci_lib.models.save_pipeline (safe_serialization).")
    out = Path(out_folder)
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise ValueError(f"export_release: {out} lies inside the model folder {src}; choose another output folder")
    with atomic_dir(out) as tmp:
        shutil.copy2(src / "model_index.json", tmp / "model_index.json")
        for part in parts:
            shutil.copytree(src / part, tmp / part)
        for extra in RELEASE_EXTRAS:
            if (src / extra).is_file():
                shutil.copy2(src / extra, tmp / extra)
        (tmp / "README.md").write_text(card_text)
    return out
