"""Aggregate every result.json below a folder into the VTAB-1K table (last epoch, then best-of-test).

    python tools/vtab_table.py runs/ [--format markdown|csv|latex] [--out FILE] [--published [all]] [--plot PATH]

The same as ``python -m petl_zoo.results``; the logic lives in the petl_zoo.results package (docs/table.md).
"""

import sys

from petl_zoo.results.cli import main

if __name__ == "__main__":
    sys.exit(main())
