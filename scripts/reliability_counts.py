"""Add up the fault ledgers the fault-injection suite writes, for docs/reliability.md.

Usage (the command docs/reliability.md quotes):

    python -m pytest tests/test_faults_*.py tests/test_fuzz.py -q --basetemp=/tmp/orca-faults
    python scripts/reliability_counts.py /tmp/orca-faults [--markdown]

Every test of the suite records each fault it injects in a session ledger (tests/faultkit.py),
written to ``<basetemp>/reliability/ledger-<pid>.json`` when the session ends. Outcomes:
detected (an OrcaDiffError, nothing wrong written), recovered (the fault was survived and the
output proved byte-identical, or a fuzzed input was accepted consistently), silent (wrong
output with no error) and unhandled (another exception escaped). Exits 1 unless the last two
are zero.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

OUTCOMES = ("detected", "recovered", "silent", "unhandled")


def collect(basetemp: Path) -> tuple[dict[str, Counter], list[str]]:
    suites: dict[str, Counter] = {}
    bad: list[str] = []
    files = sorted((basetemp / "reliability").glob("ledger-*.json"))
    if not files:
        raise SystemExit(f"{basetemp}: no reliability/ledger-*.json; run the suite with --basetemp={basetemp} first")
    for f in files:
        doc = json.loads(f.read_text())
        for suite, counts in doc["suites"].items():
            suites.setdefault(suite, Counter()).update(counts)
        bad += doc.get("bad_cases", [])
    return suites, bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("basetemp", type=Path, help="the --basetemp the suite ran with")
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = ap.parse_args(argv)
    suites, bad = collect(args.basetemp)
    total = Counter()
    rows = []
    for suite in sorted(suites):
        c = suites[suite]
        total.update(c)
        rows.append((suite, sum(c.values()), c["detected"], c["recovered"], c["silent"], c["unhandled"]))
    rows.append(("total", sum(total.values()), total["detected"], total["recovered"], total["silent"], total["unhandled"]))
    head = ("suite", "cases tried", "detected (error)", "recovered (identical output)", "silent corruptions", "unhandled")
    if args.markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for r in rows:
            cells = [f"**{x}**" if r[0] == "total" else str(x) for x in r]
            print("| " + " | ".join(cells) + " |")
    else:
        w = max(len(r[0]) for r in rows)
        print(f"{'suite':<{w}}  {'tried':>7} {'detected':>9} {'recovered':>10} {'silent':>7} {'unhandled':>10}")
        for r in rows:
            print(f"{r[0]:<{w}}  {r[1]:>7} {r[2]:>9} {r[3]:>10} {r[4]:>7} {r[5]:>10}")
    survived = total["detected"] + total["recovered"]
    print(f"\ncases tried: {sum(total.values())}; faults survived: {survived}; "
          f"silent corruptions: {total['silent']}; unhandled exceptions: {total['unhandled']}")
    for b in bad:
        print(f"BAD: {b}", file=sys.stderr)
    return 1 if total["silent"] or total["unhandled"] else 0


if __name__ == "__main__":
    sys.exit(main())
