"""Entry points: ``main`` (tools/train.py) and ``eval_main`` (tools/eval.py).

User errors (bad options, unknown names, missing files, a clobbered run folder, a NaN loss) end with
one ``error: ...`` line on stderr and a non-zero exit status, without a traceback; set
``PETL_ZOO_DEBUG=1`` to see the traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from . import distributed as D
from .args import TrainingError, build_train_parser
from .backbone import WeightsUnavailableError

__all__ = ["main", "eval_main"]

_USER_ERRORS = (ValueError, FileNotFoundError, WeightsUnavailableError, TrainingError)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _guarded(body: Callable[[], int]) -> int:
    try:
        return body()
    except SystemExit as exit_:  # argparse: --help (0) or a usage error (2, message already printed)
        code = exit_.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except _USER_ERRORS as err:
        if os.environ.get("PETL_ZOO_DEBUG"):
            raise
        sys.stderr.write(f"error: {_one_line(err)}\n")
        sys.stderr.flush()
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        return 130


def main(argv: list[str] | None = None) -> int:
    """``tools/train.py``: train one method on one task; returns the exit status."""
    from .loop import SimulatedKill, default_argv, resolve_spec, run_training

    def body() -> int:
        args = build_train_parser().parse_args(argv)
        info, device = D.setup(args.device)
        try:
            spec = resolve_spec(args, device, default_argv(argv))
            try:
                run_training(spec, info)
            except SimulatedKill as stop:
                if info.is_main:
                    sys.stderr.write(f"{stop}\n")
                return 137
            return 0
        finally:
            D.teardown()

    return _guarded(body)


def eval_main(argv: list[str] | None = None) -> int:
    """``tools/eval.py``: evaluate a saved adapter; returns the exit status."""
    from .eval import run_eval

    return _guarded(lambda: run_eval(argv))
