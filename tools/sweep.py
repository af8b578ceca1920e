#!/usr/bin/env python
"""Run every VTAB-1K task (x seeds) for one method, or print one command per run for a scheduler.

    python tools/sweep.py --method neat --model vit_base_patch16_224 --tasks all [--seeds 0 1 2] \
        [--out-root runs] [--data-root DIR] [--print-commands] [--launcher 'torchrun --nproc_per_node 8'] \
        [--overwrite] [-- extra trainer flags, e.g. --opt rank=8 --epochs 100]
    python tools/sweep.py --methods lora,neat --tasks all --seeds 0 1 2 --grid lr=1e-3,5e-3 wd=1e-4,1e-3 \
        [--grid-opt rank=4,8] [--preset paper] [--launcher submitit --slurm-partition gpu --slurm-time 240]

Finished runs of the same settings are skipped, runs of other settings refused (``--overwrite``
replaces them), runs in use by another process left alone (see docs/reliability.md).

The same as ``petl-zoo sweep`` (see petl_zoo/sweep/ and docs/sweep.md).
"""

import sys

from petl_zoo.sweep import main

if __name__ == "__main__":
    sys.exit(main(prog="tools/sweep.py"))
