"""``python -m petl_zoo.train``: the trainer (the same as ``petl-zoo train`` and ``tools/train.py``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
