"""`deltakd rehearse build DIR` / `deltakd rehearse run DIR`."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "rehearse",
        help="the 7B->1.5B recipe at real shapes, offline (models, data, runs)",
        description=(
            "A rehearsal of the paper's runs on a CPU machine: `build` writes the real "
            "config.json of Qwen2.5-7B / -7B-Instruct / -1.5B (and Llama-3.1-8B / 3.2-1B) at "
            "1 layer with random bf16 weights, their tokenizers, and ultrachat_200k / "
            "OpenMathReasoning with their published schemas, in the Hugging Face cache layout "
            "under DIR; `run` trains the shipped configs against it with HF_HOME=DIR "
            "HF_HUB_OFFLINE=1 and prints one table."
        ),
    )
    actions = parser.add_subparsers(dest="rehearse_command", metavar="ACTION", required=True)
    b = actions.add_parser("build", help="write the rehearsal world into DIR (~2-3 min, ~12 GB)")
    b.add_argument("dir", help="output directory (use it as HF_HOME)")
    b.add_argument("--layers", type=int, default=1, help="decoder layers per model (1)")
    b.add_argument("--families", default="qwen,llama", help="model families: qwen, llama (both)")
    b.add_argument("--seed", type=int, default=0, help="weights and data seed (0)")
    b.add_argument(
        "--quick", action="store_true",
        help="a few rows per split: enough for `run --quick`, not for the full run",
    )  # fmt: skip
    b.set_defaults(func=_build)
    r = actions.add_parser("run", help="train the shipped configs against DIR; print the table")
    r.add_argument("dir", help="a directory written by `deltakd rehearse build`")
    r.add_argument(
        "--quick", action="store_true",
        help="1 process, delta_kd with references: local, per family (the make-test variant)",
    )  # fmt: skip
    r.add_argument("--nproc", type=int, default=2, help="torchrun processes per row (2)")
    r.add_argument("--steps", type=int, default=2, help="training steps per row (2)")
    r.add_argument("--families", default=None, help="quick: families to run (all built)")
    r.add_argument("--rows", default=None, help="comma-separated row name prefixes to run")
    r.add_argument("--out", default=None, help="runs directory (DIR/runs)")
    r.set_defaults(func=_run)


def _build(args: argparse.Namespace) -> int:
    from deltakd.errors import ConfigError
    from deltakd.rehearse.world import build

    families = tuple(f.strip() for f in args.families.split(",") if f.strip())
    bad = [f for f in families if f not in ("qwen", "llama")]
    if bad or args.layers < 1:
        raise ConfigError(
            f"--families {args.families!r} / --layers {args.layers}: use families from "
            "qwen,llama and at least 1 layer."
        )
    from deltakd.rehearse.world import QUICK_ROWS

    info = build(args.dir, families=families, layers=args.layers, seed=args.seed,
                 rows=QUICK_ROWS if args.quick else None)  # fmt: skip
    print(f"rehearsal world written to {args.dir} in {info['seconds']:.0f} s; use it with")
    print(f"  HF_HOME={args.dir} HF_HUB_OFFLINE=1 deltakd train configs/qwen2.5-7b-to-1.5b-*.yaml")
    return 0


def _run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from deltakd.rehearse.run import rehearse

    built = json.loads((Path(args.dir) / "rehearsal.json").read_text()) if (
        Path(args.dir) / "rehearsal.json").is_file() else {}  # fmt: skip
    prefixes = {"qwen": "Qwen/", "llama": "meta-llama/"}
    if args.families:
        families = tuple(args.families.split(","))
    else:
        models = built.get("models", {})
        families = tuple(
            f for f, pre in prefixes.items() if any(r.startswith(pre) for r in models)
        ) or ("qwen",)
    results = rehearse(
        args.dir, quick=args.quick, nproc=args.nproc, steps=args.steps, families=families,
        rows=args.rows.split(",") if args.rows else None, out=args.out,
    )  # fmt: skip
    return 0 if all(r.status == "ok" for r in results) else 1
