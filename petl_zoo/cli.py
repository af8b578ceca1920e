"""``petl-zoo``: one console command for every tool (``petl-zoo train ...``, ``petl-zoo sweep ...``).

Each subcommand is the ``main(argv)`` of a package module, imported only when it runs, so
``petl-zoo --help`` is fast and an installed package needs no checkout (``tools/*.py`` are thin shells
over the same functions).
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Sequence

__all__ = ["COMMANDS", "main"]

#: subcommand -> ("module:function", one-line help). Each takes ``argv`` (and ``prog`` where it accepts one).
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("petl_zoo.train.cli:main", "train a method on a VTAB-1K task (also under torchrun)"),
    "eval": ("petl_zoo.train.eval:eval_main", "evaluate a saved adapter / run folder, plain or merged"),
    "sweep": (
        "petl_zoo.sweep:main",
        "run (or print) methods x tasks x seeds; --grid/--tune: tuned on val200",
    ),
    "table": ("petl_zoo.results.cli:main", "the VTAB-1K table of every result.json below a folder"),
    "card": ("petl_zoo.cards:main", "a Hugging Face model card for a finished run (and --push-to-hub)"),
    "bench": ("petl_zoo.accounting.cli:main", "parameters, FLOPs, memory and step time of methods"),
    "prepare": ("vtab.prepare:main", "write VTAB-1K task folders (list files + images)"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: petl-zoo COMMAND [ARGS...]   (petl-zoo COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines) + "\n"


def _call(target: str, argv: list[str], prog: str) -> int:
    module_name, _, function = target.partition(":")
    entry = getattr(importlib.import_module(module_name), function)
    takes_prog = "prog" in inspect.signature(entry).parameters
    return int((entry(argv, prog=prog) if takes_prog else entry(argv)) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch ``petl-zoo COMMAND ARGS`` to the command's ``main``; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        sys.stdout.write(_usage())
        return 0
    if args[0] in ("-V", "--version"):
        from .version import __version__

        print(f"petl-zoo {__version__}")
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        sys.stderr.write(f"error: unknown command {name!r}; valid commands: {', '.join(COMMANDS)}\n")
        return 2
    return _call(COMMANDS[name][0], rest, prog=f"petl-zoo {name}")


if __name__ == "__main__":
    sys.exit(main())
