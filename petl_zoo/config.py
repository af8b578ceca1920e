"""Typed method configs: dataclasses whose fields are validated and parsed from Python or CLI values.

A field's valid range is declared once, on the field, with :func:`positive`, :func:`non_negative`,
:func:`fraction`, :func:`nonzero` or :func:`bounded`::

    @dataclass
    class LoraConfig(MethodConfig):
        rank: int = positive(8)
        dropout: float = fraction(0.0)

Every config checks its field types, those ranges and its own :meth:`MethodConfig.validate` when it is
constructed, so ``LoraConfig(rank=0)`` fails like ``petl_zoo.create("lora", model, rank=0)`` does, with
the same one-line error (``rank must be a positive integer, got 0``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from typing import Any, ClassVar, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

__all__ = [
    "MethodConfig",
    "Range",
    "positive",
    "non_negative",
    "fraction",
    "nonzero",
    "bounded",
    "coerce_value",
    "parse_cli_value",
    "parse_key_values",
    "split_key_value",
]

C = TypeVar("C", bound="MethodConfig")
RANGE_KEY = "petl_range"


@dataclasses.dataclass(frozen=True)
class Range:
    """The valid values of a numeric config field (attached to the field by :func:`bounded` and friends).

    ``low``/``high`` bound the value (``*_open``: strictly); ``nonzero`` excludes 0; float values must
    also be finite. ``none`` says what None means for a field that accepts it; ``hint`` is appended.
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    nonzero: bool = False
    none: str = ""
    hint: str = ""

    def contains(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return not (self.nonzero and value == 0)

    def describe(self, integer: bool) -> str:
        """``'a positive integer'``, ``'in [0, 1)'``, ``'a finite number >= 0'`` ... (plus hint and None)."""
        if integer and self.high is None and self.low == 0 and not self.nonzero:
            text = "a positive integer" if self.low_open else "a non-negative integer"
        elif self.low is not None and self.high is not None:
            text = f"{'(' if self.low_open else '['}{_num(self.low)}, {_num(self.high)}{')' if self.high_open else ']'}"
            text = ("an integer in " if integer else "in ") + text
        else:
            text = "an integer" if integer else "a finite number"
            if self.nonzero:
                text = "a non-zero integer" if integer else "a finite non-zero number"
            if self.low is not None:
                text += f" {'>' if self.low_open else '>='} {_num(self.low)}"
            if self.high is not None:
                text += f" {'<' if self.high_open else '<='} {_num(self.high)}"
        if self.hint:
            text += f" ({self.hint})"
        if self.none:
            text += f" or None ({self.none})"
        return text


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def bounded(default: Any, **limits: Any) -> Any:
    """A dataclass field with ``default`` whose values must lie in ``Range(**limits)``."""
    return dataclasses.field(default=default, metadata={RANGE_KEY: Range(**limits)})


def positive(default: Any, *, none: str = "", hint: str = "") -> Any:
    """A field that must be > 0 (``none``: what None means, for fields that accept it)."""
    return bounded(default, low=0, low_open=True, none=none, hint=hint)


def non_negative(default: Any, *, hint: str = "") -> Any:
    """A field that must be >= 0."""
    return bounded(default, low=0, hint=hint)


def fraction(default: float, *, low_open: bool = False, high_open: bool = True) -> Any:
    """A field in [0, 1) by default (dropout, ratios); ``low_open``/``high_open`` choose the ends."""
    return bounded(default, low=0, high=1, low_open=low_open, high_open=high_open)


def nonzero(default: float) -> Any:
    """A finite non-zero float field (a scale that must not switch the update off)."""
    return bounded(default, nonzero=True)


@dataclasses.dataclass
class MethodConfig:
    """Base class of every method's config dataclass.

    Subclasses declare typed fields whose defaults are the paper's VTAB-1K setting, with their ranges
    (:func:`positive` ...), and may override :meth:`validate` for the rest (targets, cross-field rules;
    raise ``ValueError`` naming the bad value and the valid ones). ``renamed`` maps former option names
    to current ones: the old name is rejected with a message naming the new one.
    """

    renamed: ClassVar[dict[str, str]] = {}

    def __post_init__(self) -> None:
        types_ = self.field_types()
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            try:
                value = coerce_value(value, types_[f.name])
            except (TypeError, ValueError) as err:
                raise ValueError(f"bad value {value!r} for option {f.name!r}: {err}") from None
            object.__setattr__(self, f.name, value)  # also for frozen subclasses
            limits = f.metadata.get(RANGE_KEY)
            if limits is not None and value is not None and not limits.contains(value):
                integer = isinstance(value, int)
                raise ValueError(f"{f.name} must be {limits.describe(integer)}, got {value!r}")
        self.validate()

    def validate(self) -> None:
        """Checks beyond types and declared ranges (both done at construction); none in the base class."""

    @classmethod
    def field_types(cls) -> dict[str, Any]:
        hints = get_type_hints(cls)
        return {f.name: hints[f.name] for f in dataclasses.fields(cls)}

    @classmethod
    def from_options(cls: type[C], method: str = "", **options: Any) -> C:
        """Build a config from keyword options, checking names, types and ranges.

        String values (from a command line) are parsed into the field's type.
        """
        types_ = cls.field_types()
        label = f" for method '{method}'" if method else ""
        for key in options:
            if key in cls.renamed:
                new = cls.renamed[key]
                raise ValueError(f"option {key!r}{label} was renamed: {key!r} is now {new!r}")
        unknown = [k for k in options if k not in types_]
        if unknown:
            valid = ", ".join(sorted(types_)) or "(none)"
            raise ValueError(f"unknown option {unknown[0]!r}{label}; valid options: {valid}")
        values = {}
        for key, value in options.items():
            try:
                values[key] = coerce_value(value, types_[key])
            except (TypeError, ValueError) as err:
                raise ValueError(f"bad value {value!r} for option {key!r}{label}: {err}") from None
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any], method: str = "") -> C:
        return cls.from_options(method, **data)


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def parse_cli_value(text: str) -> Any:
    """Parse a command-line option value: JSON when it parses (numbers, booleans, lists), else the string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return text


def split_key_value(item: str, what: str) -> tuple[str, str]:
    """``'rank=8'`` -> ``('rank', '8')``; a ValueError naming ``what`` (the flag) when there is no ``=``."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"{what} {item!r} is not KEY=VALUE")
    return key.strip(), value


def parse_key_values(items: list[str], what: str) -> dict[str, Any]:
    """``['a=1', 'b=x,y']`` -> ``{'a': 1, 'b': 'x,y'}`` (values through :func:`parse_cli_value`; JSON lists
    become tuples). The one KEY=VALUE parser of every tool; ``what`` names the flag in errors."""
    out: dict[str, Any] = {}
    for item in items:
        key, value = split_key_value(item, what)
        parsed = parse_cli_value(value)
        out[key] = tuple(parsed) if isinstance(parsed, list) else parsed
    return out


def coerce_value(value: Any, tp: Any) -> Any:
    """Convert ``value`` to the annotated type ``tp`` or raise ``TypeError``/``ValueError``.

    Supports bool, int, float, str, ``Literal[...]``, ``X | None``, ``tuple[T, ...]`` and ``tuple[A, B]``.
    Strings are parsed (``"8"`` -> 8, ``"q,v"`` -> ``('q', 'v')`` for tuples).
    """
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce_value(value, arg)
            except (TypeError, ValueError) as err:
                errors.append(str(err))
        raise ValueError("; ".join(errors) or f"expected {tp}")
    if origin is Literal:
        choices = get_args(tp)
        if value in choices:
            return value
        raise ValueError(f"expected one of {', '.join(repr(c) for c in choices)}")
    if origin is tuple:
        args = get_args(tp)
        if isinstance(value, str):
            parsed = parse_cli_value(value)
            value = parsed if isinstance(parsed, list) else [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"expected a sequence, got {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce_value(v, args[0]) for v in value)
        if len(args) != len(value):
            raise ValueError(f"expected {len(args)} values, got {len(value)}")
        return tuple(coerce_value(v, a) for v, a in zip(value, args))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.strip().lower() in ("true", "1", "yes")
        raise TypeError(f"expected a bool, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise TypeError("expected an int, got a bool")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            return int(value.strip())
        raise TypeError(f"expected an int, got {type(value).__name__}")
    if tp is float:
        if isinstance(value, bool):
            raise TypeError("expected a float, got a bool")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            return float(value.strip())
        raise TypeError(f"expected a float, got {type(value).__name__}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise TypeError(f"expected a string, got {type(value).__name__}")
    if tp is Any or tp is typing.Any:
        return value
    raise TypeError(f"unsupported option type {_type_name(tp)}")
