#!/usr/bin/env python
"""Train a PETL method on a VTAB-1K task: ``python tools/train.py --method lora --task dtd`` (see docs/train.md)."""

import sys

from petl_zoo.train import main

if __name__ == "__main__":
    sys.exit(main(prog="tools/train.py"))
