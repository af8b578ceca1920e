"""Typed method configs: dataclasses whose fields are validated and parsed from Python or CLI values."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

__all__ = ["MethodConfig", "coerce_value", "parse_cli_value", "parse_key_values", "split_key_value"]

C = TypeVar("C", bound="MethodConfig")


@dataclasses.dataclass
class MethodConfig:
    """Base class of every method's config dataclass.

    Subclasses declare typed fields whose defaults are the paper's VTAB-1K setting, and may override
    :meth:`validate` to check ranges (raise ``ValueError`` naming the bad value and the valid ones).
    """

    def validate(self) -> None:
        """Check value ranges; the base class only checks types (done in :meth:`from_options`)."""

    @classmethod
    def field_types(cls) -> dict[str, Any]:
        hints = get_type_hints(cls)
        return {f.name: hints[f.name] for f in dataclasses.fields(cls)}

    @classmethod
    def from_options(cls: type[C], method: str = "", **options: Any) -> C:
        """Build a config from keyword options, checking names and types.

        String values (from a command line) are parsed into the field's type.
        """
        types_ = cls.field_types()
        label = f" for method '{method}'" if method else ""
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
        config = cls(**values)
        config.validate()
        return config

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
