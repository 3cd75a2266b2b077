"""The `deltakd` command.

Each subpackage owns its subcommands in a `commands` module with a `register(subparsers)`
function; this file only lists those modules, so commands stay next to the code they drive.
Heavy imports (torch, transformers) happen inside the command handlers, so `deltakd --help`
is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from deltakd import __version__
from deltakd.errors import DeltaKDError

# Modules that define subcommands, in the order `--help` lists them. A module that does not
# exist yet (work in progress) is skipped, so `--help` lists exactly what exists.
COMMAND_MODULES: tuple[str, ...] = (
    "deltakd.demo",
    "deltakd.train.commands",
    "deltakd.eval.commands",
    "deltakd.references.commands",
    "deltakd.references.cache.commands",
    "deltakd.data.commands",
    "deltakd.bench.commands",
    "deltakd.rehearse.commands",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deltakd",
        description="Delta Knowledge Distillation (arXiv 2509.14526) and KD baselines.",
    )
    parser.add_argument("--version", action="version", version=f"deltakd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except DeltaKDError as exc:
        print(f"deltakd {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"deltakd {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
