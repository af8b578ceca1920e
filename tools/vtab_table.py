"""Aggregate every result.json below a folder into the VTAB-1K table (last epoch, then best-of-test).

    python tools/vtab_table.py runs/ [--format markdown|csv|latex] [--out FILE] [--published [all]] [--plot PATH]

The same as ``python -m petl_zoo.table``; the logic lives in petl_zoo.table (docs/table.md).
"""

import sys

from petl_zoo.table import main

if __name__ == "__main__":
    sys.exit(main())
