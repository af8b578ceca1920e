"""``python -m petl_zoo.train``: the trainer (the same command line as ``tools/train.py``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m petl_zoo.train"))
