"""Component parameters: frozen dataclasses with typed fields, validated by one coercer.

A component declares its parameters as a frozen dataclass deriving from :class:`Params`; each field uses
:func:`param` for its default and its ``help`` / ``choices`` / ``min`` / ``max`` metadata::

    @dataclass(frozen=True)
    class ActiveCountParams(Params):
        epsilon: float = param(0.1, help="threshold on |activation|", min=0.0)

The same coercer (:func:`coerce`) turns Python values, CLI strings and config-file values into an
instance, so a parameter means the same thing everywhere. Constructing the dataclass directly validates
too (``__post_init__``).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, cast

from convlens.core.errors import ParameterError, did_you_mean

_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f"}
_NONE_STRINGS = {"none", "null"}


def param(
    default: Any = dataclasses.MISSING,
    *,
    help: str = "",
    choices: typing.Sequence[Any] | None = None,
    min: float | None = None,
    max: float | None = None,
) -> Any:
    """A dataclass field with convlens metadata. Every parameter needs a default."""
    if default is dataclasses.MISSING:
        raise TypeError("a convlens parameter needs a default value")
    metadata = {"help": help, "choices": tuple(choices) if choices is not None else None, "min": min, "max": max}
    return dataclasses.field(default=default, metadata=metadata)


class Params:
    """Base of every parameter dataclass; validates on construction."""

    def __post_init__(self) -> None:
        for spec in parameter_specs(type(self)):
            object.__setattr__(self, spec.name, spec.coerce(getattr(self, spec.name), owner=_owner_name(self)))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values (tuples become lists)."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(cast(Any, self))}


@dataclasses.dataclass(frozen=True)
class NoParams(Params):
    """For components that take no parameters."""


def _owner_name(params: Params) -> str:
    return getattr(params, "_convlens_owner", None) or type(params).__name__


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


@dataclasses.dataclass(frozen=True)
class ParameterSpec:
    """One parameter, with its resolved type, read from a dataclass field."""

    name: str
    annotation: Any
    default: Any
    help: str
    choices: tuple[Any, ...] | None
    min: float | None
    max: float | None

    @property
    def optional(self) -> bool:
        return _is_optional(self.annotation)

    @property
    def base_type(self) -> Any:
        return _strip_optional(self.annotation)

    @property
    def is_flag(self) -> bool:
        return self.base_type is bool and not self.optional

    def type_name(self) -> str:
        name = _type_name(self.base_type)
        return f"{name} or none" if self.optional else name

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type_name(),
            "default": _jsonable(self.default),
            "help": self.help,
            "choices": list(self.choices) if self.choices is not None else None,
            "min": self.min,
            "max": self.max,
        }

    def coerce(self, value: Any, owner: str) -> Any:
        """Convert ``value`` to this parameter's type and check its choices and range."""
        try:
            converted = _convert(value, self.annotation)
        except _Invalid as exc:
            raise ParameterError(f"{owner}: parameter '{self.name}' must be {exc.expected} (got {value!r})") from None
        self._check_bounds(converted, owner)
        return converted

    def _check_bounds(self, value: Any, owner: str) -> None:
        if value is None:
            return
        items = value if isinstance(value, tuple) else (value,)
        for item in items:
            if self.choices is not None and item not in self.choices:
                options = ", ".join(repr(c) for c in self.choices)
                raise ParameterError(
                    f"{owner}: parameter '{self.name}' must be one of {options} (got {item!r})"
                    + did_you_mean(str(item), [str(c) for c in self.choices])
                )
            if self.min is not None and item < self.min:
                raise ParameterError(f"{owner}: parameter '{self.name}' must be >= {self.min} (got {item!r})")
            if self.max is not None and item > self.max:
                raise ParameterError(f"{owner}: parameter '{self.name}' must be <= {self.max} (got {item!r})")


def parameter_specs(params_cls: type) -> list[ParameterSpec]:
    """The parameters of a :class:`Params` dataclass, in declaration order."""
    cached = params_cls.__dict__.get("_convlens_specs")
    if cached is not None:
        return cached
    if not (isinstance(params_cls, type) and dataclasses.is_dataclass(params_cls)):
        raise TypeError(f"{params_cls!r} is not a parameter dataclass")
    hints = typing.get_type_hints(params_cls)
    specs = []
    for f in dataclasses.fields(params_cls):
        if not f.init:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        choices = f.metadata.get("choices")
        if choices is None and typing.get_origin(_strip_optional(hints[f.name])) is typing.Literal:
            choices = tuple(typing.get_args(_strip_optional(hints[f.name])))
        specs.append(
            ParameterSpec(
                name=f.name,
                annotation=hints[f.name],
                default=default,
                help=f.metadata.get("help", ""),
                choices=choices,
                min=f.metadata.get("min"),
                max=f.metadata.get("max"),
            )
        )
    type.__setattr__(params_cls, "_convlens_specs", specs)
    return specs


def coerce(params_cls: type, values: Mapping[str, Any] | None = None, *, owner: str | None = None) -> Any:
    """Build a ``params_cls`` instance from ``values`` (Python values, CLI strings or config values).

    Unknown keys are rejected with the list of valid ones; keys may use '-' or '_'.
    """
    owner = owner or params_cls.__name__
    specs = {s.name: s for s in parameter_specs(params_cls)}
    converted: dict[str, Any] = {}
    for raw_key, value in (values or {}).items():
        key = str(raw_key).replace("-", "_")
        if key not in specs:
            valid = ", ".join(specs) if specs else "none"
            raise ParameterError(
                f"{owner} has no parameter '{raw_key}'{did_you_mean(key, specs)} (valid parameters: {valid})"
            )
        converted[key] = specs[key].coerce(value, owner)
    instance: Any = object.__new__(params_cls)
    object.__setattr__(instance, "_convlens_owner", owner)
    try:
        type(instance).__init__(instance, **converted)
    finally:
        object.__delattr__(instance, "_convlens_owner")
    return instance


def describe(params_cls: type) -> list[dict[str, Any]]:
    """JSON-ready description of every parameter."""
    return [s.describe() for s in parameter_specs(params_cls)]


class _Invalid(Exception):
    def __init__(self, expected: str):
        super().__init__(expected)
        self.expected = expected


def _is_optional(annotation: Any) -> bool:
    return _is_union(annotation) and type(None) in typing.get_args(annotation)


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _strip_optional(annotation: Any) -> Any:
    if _is_optional(annotation):
        rest = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
        return typing.Union[tuple(rest)]  # noqa: UP007 (runtime construction)
    return annotation


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is tuple:
        args = typing.get_args(annotation)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {_type_name(args[0])}"
        return "(" + ", ".join(_type_name(a) for a in args) + ")"
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    return getattr(annotation, "__name__", str(annotation))


def _convert(value: Any, annotation: Any) -> Any:
    if _is_optional(annotation):
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE_STRINGS):
            return None
        return _convert(value, _strip_optional(annotation))
    origin = typing.get_origin(annotation)
    if origin is tuple:
        return _convert_tuple(value, typing.get_args(annotation))
    if origin is typing.Literal:
        allowed = typing.get_args(annotation)
        for option in allowed:
            if value == option or (isinstance(value, str) and str(option) == value):
                return option
        raise _Invalid("one of " + ", ".join(repr(a) for a in allowed))
    if annotation is bool:
        return _to_bool(value)
    if annotation is int:
        return _to_int(value)
    if annotation is float:
        return _to_float(value)
    if annotation is str:
        if isinstance(value, str):
            return value
        raise _Invalid("a string")
    raise TypeError(f"unsupported parameter type {annotation!r}")


def _convert_tuple(value: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
    if isinstance(value, str):
        items: list[Any] = [v.strip() for v in value.split(",") if v.strip()]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        items = [value]
    if len(args) == 2 and args[1] is Ellipsis:
        expected = f"a comma-separated list of {_type_name(args[0])}"
        try:
            return tuple(_convert(v, args[0]) for v in items)
        except _Invalid:
            raise _Invalid(expected) from None
    expected = f"{len(args)} comma-separated values ({', '.join(_type_name(a) for a in args)})"
    if len(items) != len(args):
        raise _Invalid(expected)
    try:
        return tuple(_convert(v, a) for v, a in zip(items, args))
    except _Invalid:
        raise _Invalid(expected) from None


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
    raise _Invalid("true or false")


def _to_int(value: Any) -> int:
    if isinstance(value, bool):
        raise _Invalid("an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise _Invalid("an integer")


def _to_float(value: Any) -> float:
    if isinstance(value, bool):
        raise _Invalid("a number")
    if isinstance(value, (int, float)):
        result = float(value)
    elif isinstance(value, str):
        try:
            result = float(value.strip())
        except ValueError:
            raise _Invalid("a number") from None
    else:
        raise _Invalid("a number")
    if math.isnan(result):
        raise _Invalid("a number, not NaN")
    return result


def click_parameters(
    params_cls: type, *, reserved: typing.Collection[str] = (), prefix: str = "", dest_prefix: str = "param__"
) -> list[Any]:
    """``click.Option`` objects for every parameter of ``params_cls``.

    Values arrive as the strings the user typed and go through :func:`coerce`, so the CLI validates exactly
    like the Python API. An option left out is not passed, keeping the dataclass default. A parameter whose
    option name collides with one of ``reserved`` (the command's own options) is offered as
    ``--{prefix}-{name}``. The click parameter names are ``<dest_prefix><field>`` so that
    :func:`values_from_click` can pick them out of a callback's keyword arguments; a command offering the
    parameters of two dataclasses gives each its own ``dest_prefix``.
    """
    import click

    options = []
    for spec in parameter_specs(params_cls):
        flag = spec.name.replace("_", "-")
        if flag in reserved:
            flag = f"{prefix}-{flag}" if prefix else f"param-{flag}"
        dest = f"{dest_prefix}{spec.name}"
        details = [f"default: {_format_default(spec.default)}"]
        if spec.choices is not None:
            details.append("one of: " + ", ".join(str(c) for c in spec.choices))
        if spec.min is not None or spec.max is not None:
            low = "-inf" if spec.min is None else spec.min
            high = "inf" if spec.max is None else spec.max
            details.append(f"range: {low}..{high}")
        text = (spec.help + "  " if spec.help else "") + "[" + "; ".join(details) + "]"
        if spec.is_flag:
            options.append(click.Option([f"--{flag}/--no-{flag}", dest], default=None, help=text))
        else:
            metavar = spec.type_name().upper().replace(" ", "_")
            if spec.choices is not None:
                metavar = "[" + "|".join(str(c) for c in spec.choices) + "]"
            options.append(click.Option([f"--{flag}", dest], default=None, metavar=metavar, help=text))
    return options


def command_line_options(
    params_cls: type, values: dict[str, Any], *, reserved: typing.Collection[str] = (), prefix: str = ""
) -> list[str]:
    """The command-line words that give ``values`` as the options :func:`click_parameters` makes (same
    ``reserved`` and ``prefix``), in field order; a value of None is left out (the option cannot say it)."""
    words: list[str] = []
    for spec in parameter_specs(params_cls):
        if spec.name not in values or values[spec.name] is None:
            continue
        value = values[spec.name]
        flag = spec.name.replace("_", "-")
        if flag in reserved:
            flag = f"{prefix}-{flag}" if prefix else f"param-{flag}"
        if spec.is_flag:
            words.append(f"--{flag}" if value else f"--no-{flag}")
        elif isinstance(value, (list, tuple)):
            words += [f"--{flag}", ",".join(str(v) for v in value)]
        else:
            words += [f"--{flag}", _format_default(value)]
    return words


def values_from_click(kwargs: dict[str, Any], dest_prefix: str = "param__") -> dict[str, Any]:
    """Pop the options made by :func:`click_parameters` out of ``kwargs``; only those the user gave."""
    values = {}
    for key in [k for k in kwargs if k.startswith(dest_prefix)]:
        value = kwargs.pop(key)
        if value is not None:
            values[key[len(dest_prefix) :]] = value
    return values


def _format_default(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value) or "(empty)"
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
