"""Run every VTAB-1K task (x seeds) for one method, or print one command per run for a scheduler.

    python tools/sweep.py --method neat --model vit_base_patch16_224 --tasks all [--seeds 0 1 2] \
        [--out-root runs] [--data-root DIR] [--print-commands] [--launcher 'torchrun --nproc_per_node 8'] \
        [-- extra tools/train.py flags, e.g. --opt rank=8 --epochs 100]

Runs land in runs/<method>/<task>/ (one seed) or runs/<method>/<task>/seed<k>/ (several). Finished runs
(result.json) are skipped, killed ones (last.pt) resumed with --resume. Exit status 1 if any run failed.
"""

from __future__ import annotations

import argparse
import sys

from petl_zoo.registry import get_method
from petl_zoo.sweep import DEFAULT_TRAIN_SCRIPT, command_line, plan_sweep, resolve_tasks, run_sweep


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", required=True)
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--tasks", default="all", help="all | natural | specialized | structured | comma list")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="one folder per seed when several")
    p.add_argument("--out-root", default="runs")
    p.add_argument("--data-root", default=None)
    p.add_argument(
        "--print-commands", action="store_true", help="print one shell command per run, run nothing"
    )
    p.add_argument("--all", action="store_true", help="with --print-commands: also print finished runs")
    p.add_argument(
        "--launcher", default=None, help="command prefix replacing python, e.g. 'torchrun --nproc_per_node 8'"
    )
    p.add_argument("--train-script", default=str(DEFAULT_TRAIN_SCRIPT), help=argparse.SUPPRESS)
    p.add_argument(
        "--no-method-check", action="store_true", help="do not check --method against the registry"
    )
    args = p.parse_args(argv)
    try:
        if not args.no_method_check:
            get_method(args.method)  # fail once, here, rather than once per run
        tasks = resolve_tasks(args.tasks)
        runs = plan_sweep(
            args.method,
            args.model,
            tasks,
            seeds=args.seeds,
            out_root=args.out_root,
            data_root=args.data_root,
            extra_args=extra,
            launcher=args.launcher,
            train_script=args.train_script,
        )
    except ValueError as e:
        p.error(str(e))
    if args.print_commands:
        for run in runs:
            if run.status != "done" or args.all:
                print(command_line(run))
        return 0
    report = run_sweep(runs, log=lambda s: print(s, flush=True))
    print(report.summary(), flush=True)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
