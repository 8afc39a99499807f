"""Print a profile overlay (profiles/<name>.yaml) as `dvc exp run` flags, one `-S key=value` per
leaf, so that a profile changing only a few sections runs as parameter changes on the default
profile: DVC then re-runs only the stages whose parameters change (every stage depends on
`profile`, so `-S profile=<name>` re-runs the whole chain, the base model included).

    dvc exp run $(python scripts/overlay_flags.py profiles/full.yaml)

Lists stay whole (`-S attack.relearn=[full, lora]`); nested mappings become dotted keys."""

import shlex
import sys
from pathlib import Path

import yaml


def flags(overlay: dict, prefix: str = "") -> list[str]:
    """``-S dotted.key=value`` for every leaf of ``overlay``; values in YAML flow style, as DVC
    parses them."""
    out = []
    for key, value in overlay.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out += flags(value, prefix=f"{name}.")
        else:
            text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
            text = text.removesuffix("...").strip()  # safe_dump ends a bare scalar with "..."
            out += ["-S", f"{name}={text}"]
    return out


def main(path: Path) -> str:
    overlay = yaml.safe_load(path.read_text()) if path.is_file() else None
    if not isinstance(overlay, dict):
        raise SystemExit(f"{path}: not a profile overlay (a YAML mapping of the keys that differ)")
    if "profile" in overlay:
        raise SystemExit(f"{path}: a profile cannot select another profile (remove its 'profile' key)")
    return shlex.join(flags(overlay))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python scripts/overlay_flags.py profiles/<name>.yaml")
    print(main(Path(sys.argv[1])))
