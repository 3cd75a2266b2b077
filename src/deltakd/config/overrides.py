"""Reading a config: YAML files, `key=value` overrides (dots address nested settings, e.g.
`cache.tail_rank=64` or `method_args.num_samples=4`), merging, saving.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from deltakd.config.fields import Section, bad, field_types, suggest
from deltakd.config.schema import TrainConfig, field_names
from deltakd.errors import ConfigError


def parse_scalar(raw: str, item: str) -> Any:
    """One command-line value as a YAML scalar (`0.5` a float, `fkl` a string, `` None)."""
    try:
        return yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({exc}); quote it.") from exc


def split_override(item: str) -> tuple[str, Any]:
    """`"method_args.k=3"` -> `("method_args.k", 3)`: the key as written, the value parsed."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(
            f"override {item!r} is not KEY=VALUE: write e.g. `max_steps=100` or "
            "`method_args.num_samples=4`."
        )
    return key.strip(), parse_scalar(raw, item)


def nest_overrides(flat: Mapping[str, Any]) -> dict[str, Any]:
    """`{"method_args.k": 3}` -> `{"method_args": {"k": 3}}` (dots address nested settings)."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        parts = key.split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(
                    f"override {key!r} conflicts with an earlier override of {part!r}."
                )
        node[parts[-1]] = value
    return out


def parse_overrides(overrides: Iterable[str]) -> dict[str, Any]:
    """`["lr=1e-4", "method_args.k=3"]` -> nested dict. Values are parsed as YAML scalars."""
    return nest_overrides(dict(split_override(item) for item in overrides))


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def config_from_dict(data: Mapping[str, Any], *, source: str = "config") -> TrainConfig:
    """Build and validate a TrainConfig; unknown keys are refused with a suggestion."""
    names = set(field_names())
    unknown = [k for k in data if k not in names]
    if unknown:
        key = unknown[0]
        raise ConfigError(
            f"{source}: unknown config key {key!r}.{suggest(key, field_names())} "
            "See docs/USAGE.md (Config reference) for the fields."
        )
    hints = field_types(TrainConfig)
    nested = {name for name, tp in hints.items() if _takes_mapping(tp)}
    for key, value in data.items():
        if isinstance(value, Mapping) and key not in nested:
            raise bad(key, dict(value), "a single value, not a mapping")
    return TrainConfig(**dict(data))


def load_config(
    path: str | Path | None, overrides: Iterable[str] | Mapping[str, Any] = ()
) -> TrainConfig:
    """Load a YAML config file (or none) and apply `key=value` overrides (or a mapping)."""
    data: dict[str, Any] = {}
    source = "overrides"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(
                f"config file {p} does not exist: pass the path of a YAML config "
                "(e.g. configs/mini/delta_kd.yaml)."
            )
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"config file {p} is not valid UTF-8 YAML: {exc}. Fix the file."
            ) from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, Mapping):
            raise ConfigError(
                f"config file {p} must hold a mapping of `key: value` lines, "
                f"found {type(loaded).__name__}."
            )
        data = dict(loaded)
    over = dict(overrides) if isinstance(overrides, Mapping) else parse_overrides(overrides)
    return config_from_dict(_merge(data, over), source=source)


def save_config(config: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")


def _takes_mapping(tp: Any) -> bool:
    union = typing.get_origin(tp) in (typing.Union, types.UnionType)
    members = typing.get_args(tp) if union else (tp,)
    return any(
        m is dict
        or typing.get_origin(m) is dict
        or (isinstance(m, type) and issubclass(m, Section))
        for m in members
    )
