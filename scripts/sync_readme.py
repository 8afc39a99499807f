"""Copy the tables the figures stage generated (reports/tables/*.md) into README.md, between the
markers <!-- table:NAME:start --> and <!-- table:NAME:end -->, so that the README shows the
numbers of the last run and never numbers typed by hand. `make pipeline` runs it after `dvc repro`;
tests/test_readme.py checks that the two agree."""

import re
import sys
from pathlib import Path

MARKER = re.compile(r"(<!-- table:(?P<name>[\w-]+):start -->\n)(?P<body>.*?)(<!-- table:(?P=name):end -->)", re.S)


def sync(readme: Path, tables: Path) -> list[str]:
    """Rewrite every marked block of ``readme`` with ``tables/<name>.md``; return the names."""
    text = readme.read_text()
    names = []

    def replace(match: re.Match) -> str:
        name = match["name"]
        source = tables / f"{name}.md"
        if not source.is_file():
            raise SystemExit(f"{readme}: block {name!r} needs {source}; run `dvc repro` first")
        names.append(name)
        return match.group(1) + source.read_text() + match.group(4)

    new = MARKER.sub(replace, text)
    if new != text:
        tmp = readme.with_suffix(".md.tmp")
        tmp.write_text(new)
        tmp.replace(readme)
    return names


if __name__ == "__main__":
    root = Path(__file__).resolve().parents[1]
    done = sync(root / "README.md", root / "reports" / "tables")
    print("README tables synced:", ", ".join(done) or "none")
    sys.exit(0)
