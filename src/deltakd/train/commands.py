"""`deltakd train CONFIG [key=value ...]`."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="distill a student (any method) from a YAML config",
        description=(
            "Train a student from a YAML config (see docs/USAGE.md for every field). Any field "
            "can be overridden after the config path as key=value, e.g. "
            "`deltakd train configs/mini/delta_kd.yaml output_dir=runs/dkd max_steps=100 "
            "alpha=0.5`. A run resumes from the newest checkpoint in output_dir (resume=auto)."
        ),
    )
    p.add_argument("config", help="YAML config file")
    # REMAINDER so that flags may also follow the overrides (`... max_steps=4 --print-config`).
    p.add_argument(
        "overrides", nargs=argparse.REMAINDER, metavar="key=value", help="config overrides"
    )
    p.add_argument(
        "--print-config", action="store_true", help="print the resolved config as YAML and exit"
    )
    p.add_argument(
        "--verbose",
        action="store_true",
        help="bring back the libraries' output (loading bars, info logs, raw log dicts)",
    )
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import logging
    import os

    import yaml

    from deltakd.train.config import load_config

    # flags after the overrides land in the REMAINDER
    overrides = [o for o in args.overrides if o not in ("--print-config", "--verbose")]
    args.print_config = args.print_config or "--print-config" in args.overrides
    args.verbose = args.verbose or "--verbose" in args.overrides
    if args.verbose:
        overrides.append("verbose=true")
    config = load_config(args.config, overrides)
    if args.print_config:
        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        return 0
    # deltakd's own info lines (data summary, warnings); other libraries' only with --verbose
    logging.basicConfig(level=logging.INFO if config.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")  # fmt: skip
    logging.getLogger("deltakd").setLevel(logging.INFO)
    from deltakd.train.api import train

    result = train(config)
    if result.interrupted:
        if os.environ.get("RANK", "0") == "0":
            print(
                f"stopped by SIGTERM after step {result.global_step}; checkpoint saved in "
                f"{result.output_dir}. Run the same command again to resume."
            )
        return 143  # 128 + SIGTERM, as a shell reports a terminated command
    if os.environ.get("RANK", "0") != "0":  # torchrun / accelerate: one summary line, not N
        return 0
    loss = result.metrics.get("train_loss")
    print(
        f"trained {result.global_step} steps (mean loss {loss:.4f}); student saved to "
        f"{result.final_dir}"
    )
    return 0
