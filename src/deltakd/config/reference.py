"""The config reference in docs/USAGE.md, generated from the schema (`python -m
deltakd.train.docs` rewrites it; a test checks it is current). Sections (`cache:`,
`servers:`) get one row per key, `section.key`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

import yaml

from deltakd.config.fields import Section, field_types
from deltakd.config.schema import TrainConfig

_GROUP_TITLES = {
    "models": "Models",
    "data": "Data",
    "method": "Method",
    "references": "References",
    "optimisation": "Optimisation",
    "output": "Output, logging and checkpoints",
    "evaluation": "Evaluation during training",
    "trainer": "Passed through to transformers",
}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(inner) + (" or null" if type(None) in args else "")
    if origin is dict or tp is dict:
        return "mapping"
    return {bool: "bool", int: "int", float: "float", str: "string"}.get(tp, str(tp))


def _row(name: str, f: dataclasses.Field, tp: Any) -> str:
    if "default_text" in f.metadata:
        default_txt = f.metadata["default_text"]
    else:
        missing = f.default is dataclasses.MISSING
        default = f.default_factory() if missing else f.default  # type: ignore[misc]
        dumped = yaml.safe_dump(default, default_flow_style=True).strip()
        default_txt = "required" if default == "" else f"`{dumped.removesuffix('...').strip()}`"
    choices = f.metadata.get("choices")
    allowed = ""
    if choices is not None:
        allowed = ", ".join(f"`{c}`" for c in (choices() if callable(choices) else choices))
    help_txt = f.metadata["help"].replace("|", "\\|")
    return f"| `{name}` | {_type_name(tp)} | {default_txt} | {allowed} | {help_txt} |"


def config_reference_markdown() -> str:
    """The config reference as Markdown, generated from the schema (docs/USAGE.md embeds it)."""
    lines: list[str] = []
    hints = field_types(TrainConfig)
    current = None
    for f in dataclasses.fields(TrainConfig):
        group = f.metadata.get("group", "")
        if group != current:
            current = group
            lines += ["", f"### {_GROUP_TITLES.get(group, group)}", ""]
            lines += ["| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
        tp = hints[f.name]
        if isinstance(tp, type) and issubclass(tp, Section):
            lines.append(f"| `{f.name}` | mapping | `{{}}` |  | {f.metadata['help']} |")
            sub_hints = field_types(tp)
            for sf in dataclasses.fields(tp):
                lines.append(_row(f"{f.name}.{sf.name}", sf, sub_hints[sf.name]))
            continue
        lines.append(_row(f.name, f, tp))
    lines += _method_argument_rows()
    return "\n".join(lines).strip() + "\n"


def _method_argument_rows() -> list[str]:
    """One table of every method's `method_args` keys (each method declares a typed section)."""
    from deltakd.train.methods import get_method, method_names  # the registry (see schema.py)

    rows: list[str] = []
    seen: set[type] = set()
    for name in method_names():
        cls = get_method(name).args
        if cls is None:
            continue
        if cls in seen:
            continue
        seen.add(cls)
        users = [m for m in method_names() if get_method(m).args is cls]
        hints = field_types(cls)
        for f in dataclasses.fields(cls):
            row = _row(f"method_args.{f.name}", f, hints[f.name])
            rows.append(row.removesuffix(" |") + f" (method {', '.join(users)}) |")
    if not rows:
        return []
    head = ["", "### Method arguments (`method_args`)", "",
            "| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]  # fmt: skip
    return head + rows
