"""Benchmark every registered method: params, stored bytes, GMACs, training throughput, memory, latency.

    python tools/benchmark.py --model vit_base_patch16_224 --methods all --batch 64 [--device cuda --amp bfloat16]

The same as ``python -m petl_zoo.accounting``; the logic lives in petl_zoo.accounting (docs/benchmark.md).
"""

import sys

from petl_zoo.accounting.cli import main

if __name__ == "__main__":
    sys.exit(main())
