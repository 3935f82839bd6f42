"""Two `vlclassify bench fewshot` JSON results side by side: did a re-run keep the numbers?

    python benchmarks/studies/compare_tables.py OLD.json NEW.json --pair 'old label' 'new label' [...]

Old files may be read from git (`--old-rev REV`: OLD.json is then a path at that revision). Each
cell is `old ± std -> new`, flagged `*` where |new - old| exceeds both the old seed std and 0.5
points (the method-contract issue's bar for "the same"). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess


def _load(path: str, rev: str | None) -> dict:
    if rev:
        return json.loads(subprocess.run(["git", "show", f"{rev}:{path}"], check=True, capture_output=True).stdout)
    with open(path) as f:
        return json.load(f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--old-rev", default=None, help="read OLD from this git revision")
    ap.add_argument("--pair", nargs=2, action="append", required=True, metavar=("OLD", "NEW"), help="row labels")
    a = ap.parse_args()
    old, new = _load(a.old, a.old_rev), _load(a.new, None)
    shots = [s for s in old["shots"] if s in new["shots"]]
    print("| method (old -> new label) | " + " | ".join(f"{s}-shot" for s in shots) + " |")
    print("|---|" + "---|" * len(shots))
    flagged = 0
    for o, n in a.pair:
        cells = []
        for s in shots:
            a_, b = old["summary"][o][str(s)], new["summary"][n][str(s)]
            off = abs(b["mean"] - a_["mean"]) > max(a_["std"], 0.5)
            flagged += off
            cells.append(f"{a_['mean']:.1f} ± {a_['std']:.1f} -> {b['mean']:.1f}{' *' if off else ''}")
        print(f"| {o} -> {n} | " + " | ".join(cells) + " |")
    print(f"\n{flagged} cell(s) outside the old seed std and 0.5 points (*)")


if __name__ == "__main__":
    main()
