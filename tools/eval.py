#!/usr/bin/env python
"""Evaluate a saved adapter: ``python tools/eval.py --adapter runs/lora/dtd [--merge]`` (see docs/train.md)."""

import sys

from petl_zoo.train import eval_main

if __name__ == "__main__":
    sys.exit(eval_main(prog="tools/eval.py"))
