"""``python -m petl_zoo.results``: the table's command line (the same as ``petl-zoo table``)."""

import sys

from .cli import main

sys.exit(main(prog="python -m petl_zoo.results"))
