"""The README shows the numbers of the last pipeline run, not numbers typed by hand: every table
block between <!-- table:NAME:start/end --> markers equals reports/tables/NAME.md, which the
figures stage generates (scripts/sync_readme.py copies them after `dvc repro`), or a published
run's reports/published/RUN/tables/NAME.md for a block named RUN/NAME."""

import re
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
from sync_readme import MARKER, sync, table_file  # noqa: E402


def test_readme_tables_match_the_generated_tables():
    text = (ROOT / "README.md").read_text()
    blocks = {m["name"]: m["body"] for m in MARKER.finditer(text)}
    assert "msgr" in blocks, "the README must embed the MSGR table between <!-- table:msgr:start/end --> markers"
    for name, body in blocks.items():
        generated = table_file(name, ROOT / "reports" / "tables")
        assert generated.is_file(), f"{generated} missing: run `dvc repro` (or `make full`) and commit it"
        assert body == generated.read_text(), f"README table {name!r} differs from {generated}; run `python scripts/sync_readme.py`"


def test_sync_rewrites_a_stale_block(tmp_path):
    tables = tmp_path / "tables"
    tables.mkdir()
    (tables / "t.md").write_text("| a |\n|---|\n| 1 |\n")
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- table:t:start -->\n| a |\n|---|\n| 0 |\n<!-- table:t:end -->\nend\n")
    assert sync(readme, tables) == ["t"]
    assert "| 1 |" in readme.read_text() and "| 0 |" not in readme.read_text()
    assert re.search(r"end\n$", readme.read_text())


def test_a_published_run_block_reads_its_own_tables(tmp_path):
    (tmp_path / "tables").mkdir()
    (tmp_path / "tables" / "t.md").write_text("| default |\n")
    published = tmp_path / "published" / "full" / "tables"
    published.mkdir(parents=True)
    (published / "t.md").write_text("| full |\n")
    readme = tmp_path / "README.md"
    readme.write_text("<!-- table:t:start -->\nold\n<!-- table:t:end -->\n<!-- table:full/t:start -->\nold\n<!-- table:full/t:end -->\n")
    assert sync(readme, tmp_path / "tables") == ["t", "full/t"]
    assert readme.read_text() == "<!-- table:t:start -->\n| default |\n<!-- table:t:end -->\n<!-- table:full/t:start -->\n| full |\n<!-- table:full/t:end -->\n"
