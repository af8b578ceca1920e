"""Images/s of a mixed-adapter batch over N adapters against one adapter at a time (docs/multi_adapter.md).

    python tools/bench_multi_adapter.py --model vit_tiny_patch16_224 --model-kwargs img_size=32 patch_size=4 depth=6
    python tools/bench_multi_adapter.py --model vit_base_patch16_224 --batch 19 --rounds 3
    python tools/bench_multi_adapter.py --method neat --options rank=7 --counts 1 4 19

Random backbone weights and random adapters (throughput does not depend on the values); every variant
runs interleaved in one process. The logic is :mod:`petl_zoo.multi.bench`; this file only parses
arguments, prints the table and writes ``bench_multi_adapter.json`` to ``--out`` when given.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from petl_zoo.config import parse_key_values
from petl_zoo.multi.bench import PROXY_KWARGS, PROXY_MODEL, format_report, run_benchmark


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=PROXY_MODEL, help="timm architecture (random weights)")
    p.add_argument(
        "--model-kwargs", nargs="+", default=None, metavar="KEY=VALUE", help="architecture options"
    )
    p.add_argument("--method", default="lora", help="petl_zoo method of every adapter (default lora)")
    p.add_argument("--options", nargs="+", default=None, metavar="KEY=VALUE", help="the method's options")
    p.add_argument("--counts", nargs="+", type=int, default=[1, 4, 19], help="numbers of adapters N")
    p.add_argument("--batch", type=int, default=64, help="images per batch")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds after one warm-up")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="folder for bench_multi_adapter.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model_kwargs is None:
        kwargs = dict(PROXY_KWARGS) if args.model == PROXY_MODEL else {}
    else:
        kwargs = parse_key_values(args.model_kwargs, "--model-kwargs")
    options = parse_key_values(args.options, "--options") if args.options else {}
    result = run_benchmark(
        args.model,
        kwargs,
        method=args.method,
        options=options,
        counts=tuple(args.counts),
        batch=args.batch,
        rounds=args.rounds,
        seed=args.seed,
    )
    print(format_report(result))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_multi_adapter.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
