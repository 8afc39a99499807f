"""The study's report (research issue): ``reports/research/study.csv`` as a Markdown table, and
presence-vs-attack-step curves of chosen configurations against the model without immunization
(from the ``curves/<name>.json`` files that ``benchmarks/study.py`` writes).

    python benchmarks/study_report.py [--study reports/research/study.csv] [--curves NAME|LABEL=NAME+NAME ...]
        [--curves-attack ATTACK] [--curves-out study_curves.png]

Writes ``study_table.md`` and, with ``--curves``, the curves figure (``study_curves.png``) beside
the CSV.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mci_lib import viz  # noqa: E402
from mci_lib.artifacts import read_csv_rows, read_json, write_text  # noqa: E402

COLUMNS = ("name", "method", "overrides", "msgr", "verdict", "msgr_sim", "steps_ratio", "final_presence", "utility_presence", "utility_frechet", "immunize_seconds")


def table_rows(rows: list[dict], attack: str) -> list[dict]:
    """One table row per configuration scored on ``attack`` (rows of another threat's attacks are
    left out): MSGR as mean +- std across seeds, and the rest as stored."""
    out = []
    for r in (r for r in rows if r.get(f"msgr_{attack}")):
        out.append({
            "name": r["name"], "method": r["method"], "overrides": r["overrides"].replace("|", "/"),
            "msgr": f"{float(r[f'msgr_{attack}']):.1f} +- {float(r[f'msgr_std_{attack}']):.1f}",
            "verdict": r[f"verdict_{attack}"], "msgr_sim": r[f"msgr_sim_{attack}"], "steps_ratio": r[f"steps_ratio_{attack}"],
            "final_presence": f"{r[f'final_presence_{attack}']} / {r[f'final_presence_without_{attack}']}",
            "utility_presence": f"{r['utility_presence']} / {r['start_utility_presence']}",
            "utility_frechet": r["utility_frechet"], "immunize_seconds": r["immunize_seconds"],
        })
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", type=Path, default=ROOT / "reports" / "research" / "study.csv")
    ap.add_argument("--attack", default="lora", help="the attack whose columns the table shows")
    ap.add_argument("--curves", nargs="*", default=[],
                    help="configurations to draw against the model without immunization: NAME, or LABEL=NAME+NAME+... to pool the rows of several (the same model on more attack seeds)")
    ap.add_argument("--curves-attack", help="draw only this attack's panel")
    ap.add_argument("--curves-out", default="study_curves.png", help="file name of the curves figure, beside the CSV")
    args = ap.parse_args()
    rows = read_csv_rows(args.study)
    folder = args.study.parent
    write_text(folder / "study_table.md", viz.markdown_table(table_rows(rows, args.attack), COLUMNS))
    print(f"{len(table_rows(rows, args.attack))} of {len(rows)} configurations (those scored on {args.attack}) -> {folder / 'study_table.md'}")
    if args.curves:
        curves, baseline = [], {}
        for spec in args.curves:
            label, _, names = spec.rpartition("=")
            for name in names.split("+"):
                stored = read_json(folder / "curves" / f"{name}.json")
                curves += [{**r, "method": label or name} for r in stored["rows"]]
                # the pooled configurations share baseline runs where their seeds overlap: each once
                baseline.update({(r["attack"], r["concept"], r["seed"], r["step"], r["lr"], r["lora_rank"]): r for r in stored["baseline"]})
        curves += [{**r, "method": "no immunization"} for r in baseline.values()]
        if args.curves_attack:
            curves = [r for r in curves if r["attack"] == args.curves_attack]
            if not any(r["method"] != "no immunization" for r in curves):
                raise SystemExit(f"no stored rows of attack {args.curves_attack!r} in {', '.join(args.curves)}")
        viz.save_figure(viz.attack_curves(curves, "presence"), folder / args.curves_out)
        print(f"curves of {', '.join(args.curves)} -> {folder / args.curves_out}")


if __name__ == "__main__":
    main()
