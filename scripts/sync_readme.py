"""Copy the tables the figures stage generated (reports/tables/*.md) into README.md, between the
markers <!-- table:NAME:start --> and <!-- table:NAME:end -->, so that the README shows the
numbers of the last run and never numbers typed by hand. A block named RUN/NAME takes
reports/published/RUN/tables/NAME.md instead: a run of another profile kept by
scripts/publish_run.py (`make full`). `make pipeline` runs it; after `make full`, run it once the
workspace is back on the default profile. tests/test_readme.py checks that the README and the
tables agree."""

import re
import sys
from pathlib import Path

MARKER = re.compile(r"(<!-- table:(?P<name>[\w-]+(?:/[\w-]+)?):start -->\n)(?P<body>.*?)(<!-- table:(?P=name):end -->)", re.S)


def table_file(name: str, tables: Path) -> Path:
    """The table a block named ``name`` shows: ``tables/<name>.md``, or for ``run/name`` the
    published run's ``<tables>/../published/<run>/tables/<name>.md``."""
    if "/" in name:
        run, table = name.split("/")
        return tables.parent / "published" / run / "tables" / f"{table}.md"
    return tables / f"{name}.md"


def sync(readme: Path, tables: Path) -> list[str]:
    """Rewrite every marked block of ``readme`` with its table (``table_file``); return the names."""
    text = readme.read_text()
    names = []

    def replace(match: re.Match) -> str:
        name = match["name"]
        source = table_file(name, tables)
        if not source.is_file():
            how = f"that profile's run, then `python scripts/publish_run.py {name.split('/')[0]}`," if "/" in name else "`dvc repro`"
            raise SystemExit(f"{readme}: block {name!r} needs {source}; run {how} first")
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
