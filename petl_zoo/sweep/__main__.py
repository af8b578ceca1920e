"""``python -m petl_zoo.sweep``: the sweep command (petl_zoo.sweep.cli)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m petl_zoo.sweep"))
