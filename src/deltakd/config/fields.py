"""The field machinery of the config schema: help metadata, coercion, refusals, sections.

Every field carries its help text, its allowed values and its group in `metadata`, so one
schema validates user input, names the field and the fix in every refusal, and generates the
config reference in docs/USAGE.md (`deltakd.config.reference`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

from deltakd.errors import ConfigError


def help_meta(
    text: str,
    *,
    choices: Sequence[str] | Callable[[], Sequence[str]] | None = None,
    group: str = "",
    default_text: str | None = None,
) -> dict[str, Any]:
    """A field's `metadata`: help, allowed values (or a callable giving them), doc group and,
    where the default is decided elsewhere, how the reference describes it."""
    meta: dict[str, Any] = {"help": text, "group": group}
    if choices is not None:
        meta["choices"] = choices
    if default_text is not None:
        meta["default_text"] = default_text
    return meta


def bad(name: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"config field {name!r} = {value!r} is not allowed: expected {allowed}.")


def suggest(name: str, names: Sequence[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(name, list(names), n=1, cutoff=0.6)
    return f" Did you mean {prefix + close[0]!r}?" if close else ""


def in_range(name: str, value: float, lo: float, hi: float, *, hi_open: bool = False) -> None:
    ok = lo <= value < hi if hi_open else lo <= value <= hi
    if not ok or math.isnan(value):
        bracket = ")" if hi_open else "]"
        raise bad(name, value, f"a number in [{lo:g}, {hi:g}{bracket}")


def positive(name: str, value: float) -> None:
    if not value > 0 or math.isinf(value):
        raise bad(name, value, "a finite number > 0")


def at_least(name: str, value: int | None, lo: int, *, null: bool = False) -> None:
    if value is None and null:
        return
    if value is None or value < lo:
        raise bad(name, value, f"an integer >= {lo}" + (", or null" if null else ""))


def check_choices(name: str, value: Any, choices: Any) -> None:
    if choices is None or value is None:
        return
    allowed = tuple(choices() if callable(choices) else choices)
    if value not in allowed:
        raise bad(name, value, f"one of {', '.join(allowed)}")


def coerce(name: str, value: Any, tp: Any) -> Any:
    """Turn a YAML/CLI value into the field's type, or raise ConfigError naming the field.

    A union tries its members in order (`int | str` keeps `64` an int and `V` a string).
    """
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for member in inner[:-1]:
            try:
                return coerce(name, value, member)
            except ConfigError:
                continue
        return coerce(name, value, inner[-1])
    if origin is Literal:
        if value not in args:
            raise bad(name, value, f"one of {', '.join(map(str, args))}")
        return value
    if isinstance(tp, type) and issubclass(tp, Section):
        if isinstance(value, tp):
            return value
        if value is None:
            return tp()
        if not isinstance(value, Mapping):
            raise bad(name, value, "a mapping of settings")
        return tp.from_mapping(value, prefix=name)
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise bad(name, value, "a mapping of settings")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise bad(name, value, "true or false")
    if tp is int:
        if isinstance(value, bool):
            raise bad(name, value, "an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise bad(name, value, "an integer")
    if tp is float:
        if isinstance(value, bool):
            raise bad(name, value, "a number")
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            # PyYAML reads `1e-5` (no dot) as a string; accept it as the number it obviously is.
            try:
                return float(value)
            except ValueError:
                pass
        raise bad(name, value, "a number")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise bad(name, value, "a string")
    return value


@typing.no_type_check
def field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


class Section(Mapping[str, Any]):
    """Base of a typed nested section (`cache:`, `servers:`): a dataclass of optional fields.

    A field left unset is None and means "the consumer's default" (documented in its help);
    the section reads as a mapping of the fields that are set, so the code that consumes a
    section receives exactly what the user wrote, typed and checked. Subclasses are
    `@dataclass`es; `validate()` holds their cross-field checks.
    """

    #: the YAML key of the section (`cache`), for messages
    key: typing.ClassVar[str] = ""

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, prefix: str | None = None) -> Section:
        prefix = prefix or cls.key
        names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        for k in data:
            if k not in names:
                hint = suggest(str(k), names, prefix=f"{prefix}.")
                raise ConfigError(f"unknown config key '{prefix}.{k}'.{hint} The {prefix} settings "
                                  f"are: {', '.join(prefix + '.' + n for n in names)}.")  # fmt: skip
        return cls(**dict(data))

    def __post_init__(self) -> None:
        hints = field_types(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            name = f"{self.key}.{f.name}"
            value = coerce(name, getattr(self, f.name), hints[f.name])
            check_choices(name, value, f.metadata.get("choices"))
            setattr(self, f.name, value)
        self.validate()

    def validate(self) -> None:
        """Cross-field and range checks (raise ConfigError naming `section.field`)."""

    def _set(self) -> dict[str, Any]:
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
            if getattr(self, f.name) is not None
        }

    def __getitem__(self, key: str) -> Any:
        values = self._set()
        if key not in values:
            raise KeyError(key)
        return values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._set())

    def __len__(self) -> int:
        return len(self._set())

    def to_dict(self) -> dict[str, Any]:
        """The fields that are set (what the user wrote), for saving."""
        return {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in self._set().items()}
