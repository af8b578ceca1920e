"""The benchmark's command line: ``python -m petl_zoo.accounting`` (and ``tools/benchmark.py``).

User errors (a bad option, an unknown method, a missing weights file, an ``--out`` that cannot be
written) end with one ``error: ...`` line on stderr and a non-zero exit status (2 for the command line
itself, 1 otherwise), without a traceback; ``PETL_ZOO_DEBUG=1`` shows the traceback. ``--out`` is
checked before anything is timed.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import torch

from ..config import parse_key_values
from .outputs import ROUNDS_FILE, ROWS_FILE, OutputError, ProgressLog, write_outputs
from .report import compute_checks, format_table, plot_results
from .runner import MEMORY_MODES, run_benchmark
from .variants import default_methods, parse_method_options

__all__ = ["main", "build_parser"]

_DESCRIPTION = """\
Benchmark every registered method: params, stored bytes, GMACs, training throughput, memory, latency.

    {prog} --model vit_base_patch16_224 --methods all --batch 64 --device cuda --amp bfloat16
    {prog} --model vit_tiny_patch16_224 --model-kwargs img_size=32 patch_size=4 depth=6 \\
        --methods lora,neat,full --opt neat:rank=8 --batch 64 --plot

Checks --out first, appends each timing round and each finished row to rounds.jsonl and rows.jsonl
there as it is measured, then writes benchmark.json, benchmark.csv, checks.json (and benchmark.png with
--plot); prints the table and the checks (timing checks with their spread over rounds; inconclusive
when it straddles the target). See docs/benchmark.md.
"""


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line ``error: ...`` message (the usage is on ``--help``)."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"error: {message} (see {self.prog} --help)\n")
        raise SystemExit(2)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The benchmark's argument parser; ``prog`` defaults to the basename of ``sys.argv[0]``."""
    prog = prog or os.path.basename(sys.argv[0])
    p = _Parser(
        prog=prog,
        description=_DESCRIPTION.format(prog=prog),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--model-kwargs", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument("--pretrained-file", default=None, help="backbone weights (default: random, seed 0)")
    p.add_argument("--num-classes", type=int, default=100, help="head width (default 100)")
    p.add_argument("--methods", default="all", help="'all' or a comma list (also lora_qkv, peft_lora)")
    p.add_argument(
        "--opt",
        action="append",
        default=[],
        metavar="METHOD:KEY=VALUE",
        help="per-method option, repeatable (e.g. neat:rank=8; peft_lora:rank=R sets the rank "
        "of both peft_lora and lora_qkv)",
    )
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", default=None, choices=[None, "bfloat16", "float16"], help="autocast dtype")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument(
        "--repeats", type=int, default=5, help="interleaved rounds; the median is reported (0: no timings)"
    )
    p.add_argument("--steps", type=int, default=3, help="timed steps per method per round")
    p.add_argument("--no-flops", action="store_true", help="skip FLOP counting")
    p.add_argument(
        "--memory",
        default="breakdown",
        choices=list(MEMORY_MODES),
        help="breakdown (weights, gradients, optimizer state, activations, peak: allocator / profiler, "
        "default), child (peak RSS growth in a fresh process per method), inprocess, or off",
    )
    p.add_argument("--out", default="runs/benchmark")
    p.add_argument("--plot", action="store_true")
    return p


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _guarded(body: Callable[[], int]) -> int:
    """``body()``, with a user error reported as one ``error: ...`` line (exit status 1)."""
    from ..train.backbone import WeightsUnavailableError  # the run imports it anyway; --help does not

    try:
        return body()
    except (ValueError, FileNotFoundError, WeightsUnavailableError) as err:
        if os.environ.get("PETL_ZOO_DEBUG"):
            raise
        sys.stdout.flush()
        sys.stderr.write(f"error: {_one_line(err)}\n")
        sys.stderr.flush()
        return 1


def _plot(rows: list, path: Path, title: str) -> None:
    try:
        plot_results(rows, path, title)
    except OSError as err:
        raise OutputError(f"cannot write {path}: {err.strerror or err}") from err


def _run(args: argparse.Namespace, methods: list[str], options: dict, model_kwargs: dict[str, Any]) -> int:
    """Check --out, measure (rounds and rows appended as they come), print, then write the report files."""
    log = ProgressLog(args.out)  # an unwritable --out fails here, before anything is built or timed
    rows = run_benchmark(
        args.model,
        methods,
        batch=args.batch,
        device=args.device,
        num_classes=args.num_classes,
        model_kwargs=model_kwargs,
        pretrained_file=args.pretrained_file,
        options=options,
        warmup=args.warmup,
        repeats=args.repeats,
        steps=args.steps,
        amp=args.amp,
        flops=not args.no_flops,
        memory=args.memory,
        on_round=log.round,
        on_row=log.row,
    )
    checks = compute_checks(rows)
    meta = {
        "model": args.model,
        "num_classes": args.num_classes,
        "model_kwargs": model_kwargs,
        "batch": args.batch,
        "device": args.device,
        "amp": args.amp,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "steps": args.steps,
        "torch": torch.__version__,
    }
    title = f"{args.model} {model_kwargs} {args.num_classes} classes batch {args.batch} {args.device} {args.amp or 'fp32'}"
    print(title)
    print(format_table(rows, checks))  # on stdout before the files: a failing write loses nothing
    out = write_outputs(rows, checks, args.out, meta)
    if args.plot:
        _plot(rows, out / "benchmark.png", title)
    print(f"wrote {out} (rows as measured: {ROWS_FILE}, {ROUNDS_FILE})")
    return 0


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run the benchmark from command-line arguments; progress on stderr, the table on stdout."""
    p = build_parser(prog)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        methods = default_methods(args.methods)
        options = parse_method_options(args.opt)
        model_kwargs = parse_key_values(args.model_kwargs, "--model-kwargs")
    except ValueError as err:
        p.error(_one_line(err))
    if "num_classes" in model_kwargs:
        p.error(
            f"--model-kwargs num_classes={model_kwargs['num_classes']}: give the head width with --num-classes"
        )
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    return _guarded(lambda: _run(args, methods, options, model_kwargs))
