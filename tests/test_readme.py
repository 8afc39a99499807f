"""The README shows the numbers of the last pipeline run, not numbers typed by hand: every table
block between <!-- table:NAME:start/end --> markers equals reports/tables/NAME.md, which the
figures stage generates (scripts/sync_readme.py copies them after `dvc repro`)."""

import re
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
from sync_readme import MARKER, sync  # noqa: E402


def test_readme_tables_match_the_generated_tables():
    text = (ROOT / "README.md").read_text()
    blocks = {m["name"]: m["body"] for m in MARKER.finditer(text)}
    assert "msgr" in blocks, "the README must embed the MSGR table between <!-- table:msgr:start/end --> markers"
    for name, body in blocks.items():
        generated = ROOT / "reports" / "tables" / f"{name}.md"
        assert generated.is_file(), f"{generated} missing: run `dvc repro` and commit reports/tables"
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
