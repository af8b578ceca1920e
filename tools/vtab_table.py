"""Aggregate every result.json below a folder into the VTAB-1K table (best and last, separately).

    python tools/vtab_table.py runs/ [--format markdown|csv|latex] [--out FILE]

Blank cells are missing runs; a group mean with a missing task is blank (see the Tasks column).
"""

from __future__ import annotations

import argparse
import sys

from petl_zoo.io import atomic_write_text
from petl_zoo.table import vtab_table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", help="folder searched recursively for result.json")
    p.add_argument("--format", choices=["markdown", "csv", "latex"], default="markdown")
    p.add_argument("--out", default=None, help="write here (atomically) instead of stdout")
    args = p.parse_args(argv)
    try:
        text = vtab_table(args.root, args.format)
    except ValueError as e:
        p.error(str(e))
    if args.out:
        atomic_write_text(args.out, text)
        print(f"wrote {args.out}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
