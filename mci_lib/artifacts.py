"""Artifacts: atomic writes, metrics JSON, safetensors weights and run manifests (DESIGN section 8).

Every write goes to a temporary name beside the target and is renamed when complete, so a crash
or a bad input never leaves a partial output behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
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


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; on success it replaces ``target``."""
    target = Path(target)
    _writable_parent(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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


def write_json(path: str | Path, data: Any) -> Path:
    with atomic_file(path) as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
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


def load_training_state(folder: str | Path, tensors: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                        generators: dict[str, torch.Generator]) -> tuple[int, dict]:
    """Restore a checkpoint of :func:`save_training_state` in place: copy the trained tensors into
    ``tensors``, load the optimizer state and every RNG state. Returns ``(step, extra)``. A
    checkpoint that does not match (other tensors, other shapes, other generators) is an error
    naming the file."""
    folder = Path(folder)
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
