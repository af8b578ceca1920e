#!/usr/bin/env python
"""Train the demo backbone, a small ViT on Fashion-MNIST (see demo/README.md): ``python tools/build_demo_backbone.py``."""

import sys

from petl_zoo.demo import main

if __name__ == "__main__":
    sys.exit(main(prog="tools/build_demo_backbone.py"))
