"""The trainer's entry point ``main`` (tools/train.py, ``python -m petl_zoo.train``) and the error
handling it shares with the evaluator's ``eval.eval_main`` (tools/eval.py, ``python -m petl_zoo.train.eval``).

User errors (bad options, unknown names, missing or damaged files, a clobbered run folder, an
unreadable checkpoint, a folder that cannot be written, a NaN loss) end with one ``error: ...`` line on
stderr and exit status 1, without a traceback; a run folder in use by another live process exits with
75 (``lock.BUSY_EXIT_STATUS``), Ctrl-C with 130 and SIGTERM with 143 (both release the folder's lock
first). Set ``PETL_ZOO_DEBUG=1`` to see the traceback. ``main`` shows the trainer's log lines
(``logging.getLogger("petl_zoo.train")``, INFO) as plain text on stdout while it runs.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from ..io import WriteError
from . import distributed as D
from .args import build_train_parser
from .backbone import WeightsUnavailableError
from .errors import TrainingError
from .lock import BUSY_EXIT_STATUS, RunBusyError

__all__ = ["main", "default_argv", "Terminated"]

_USER_ERRORS = (ValueError, FileNotFoundError, WeightsUnavailableError, TrainingError, WriteError)
_TRAIN_LOGGER = "petl_zoo.train"


class Terminated(BaseException):
    """SIGTERM (a scheduler's or the sweep's stop) as an exception, so that ``finally`` blocks run and
    the run folder's lock is released."""


#: A sentence advising ``torch.load(weights_only=False)`` (torch's and timm's messages carry one): never
#: passed on, it would run whatever code a crafted file holds.
_UNSAFE_ADVICE = re.compile(r"weights_only`?\s*(=|set to)\s*`?False", flags=re.I)


def _one_line(err: BaseException) -> str:
    sentences = re.split(r"(?<=[.;])\s+", " ".join(str(err).split()))
    return " ".join(s for s in sentences if not _UNSAFE_ADVICE.search(s)) or type(err).__name__


def _report(err: BaseException, status: int) -> int:
    if os.environ.get("PETL_ZOO_DEBUG"):
        raise err
    sys.stderr.write(f"error: {_one_line(err)}\n")
    sys.stderr.flush()
    return status


def _guarded(body: Callable[[], int]) -> int:
    try:
        return body()
    except SystemExit as exit_:  # argparse: --help (0) or a usage error (2, message already printed)
        code = exit_.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except RunBusyError as err:
        return _report(err, BUSY_EXIT_STATUS)
    except _USER_ERRORS as err:
        return _report(err, 1)
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        return 130
    except Terminated:
        sys.stderr.write("error: terminated (SIGTERM)\n")
        return 143


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While inside, SIGTERM raises ``Terminated`` in the main thread (where no handler was set)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous not in (signal.SIG_DFL, None):
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise Terminated()

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _ConsoleHandler(logging.Handler):
    """Plain message lines: INFO to the current ``sys.stdout``, warnings and worse to ``sys.stderr``
    (looked up per record, so a replaced stream, e.g. pytest's capture, is honoured)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stdout if record.levelno < logging.WARNING else sys.stderr
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - logging must not raise
            self.handleError(record)


@contextmanager
def console_logging(name: str = _TRAIN_LOGGER) -> Iterator[None]:
    """Show logger ``name``'s INFO lines on stdout (not passed on to the root logger) while inside."""
    logger = logging.getLogger(name)
    handler = _ConsoleHandler(logging.INFO)
    handler.setFormatter(logging.Formatter("%(message)s"))
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def _prog(prog: str | None) -> str:
    """How usage and error lines name the command: ``prog``, else the basename of ``sys.argv[0]``."""
    if prog:
        return prog
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "petl_zoo.train"


def default_argv(argv: list[str] | None, prog: str | None = None) -> list[str]:
    """What config.json records as the command: ``tools/train.py`` + the arguments when called with
    ``argv`` (in-process) or run as tools/train.py; ``python -m petl_zoo.train ...`` when run so;
    otherwise ``sys.argv[0]`` (relative to the working folder) and its arguments."""
    if argv is not None:
        return ["tools/train.py", *argv]
    if prog and prog.startswith("python -m "):
        return [*shlex.split(prog), *sys.argv[1:]]
    return [os.path.relpath(sys.argv[0]) if sys.argv and sys.argv[0] else "tools/train.py", *sys.argv[1:]]


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """The trainer: train one method on one task; returns the exit status.

    ``argv`` defaults to ``sys.argv[1:]``; ``prog`` names the command in usage and error lines
    (default: the basename of ``sys.argv[0]``).
    """
    from .loop import SimulatedKill, run_training
    from .spec import resolve_spec

    def body() -> int:
        args = build_train_parser(_prog(prog)).parse_args(argv)
        info, device = D.setup(args.device)
        try:
            spec = resolve_spec(args, device, default_argv(argv, prog))
            try:
                run_training(spec, info)
            except SimulatedKill as stop:
                if info.is_main:
                    sys.stderr.write(f"{stop}\n")
                return 137
            return 0
        finally:
            D.teardown()

    with console_logging(), _sigterm_raises():
        return _guarded(body)
