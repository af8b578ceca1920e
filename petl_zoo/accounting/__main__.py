"""``python -m petl_zoo.accounting``: the benchmark CLI."""

import sys

from .cli import main

sys.exit(main(prog="python -m petl_zoo.accounting"))
