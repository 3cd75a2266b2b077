"""`deltakd mini build`: regenerate the miniature world from its seed."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("mini", help="the miniature world (tasks, tokenizer, tiny models)")
    actions = parser.add_subparsers(dest="mini_command", metavar="ACTION", required=True)
    build = actions.add_parser(
        "build",
        help="regenerate the world deterministically from a seed",
        description=(
            "Generate the knowledge base, tasks and pretraining corpus from SEED, train the BPE "
            "tokenizer, pretrain teacher_raw and student_raw, finetune teacher_ft and "
            "teacher_ft2 (a second SFT of teacher_raw with another seed), evaluate them and "
            "write everything (with world.json) into --out. With --only teacher_ft2, add just "
            "that teacher to the existing world in --out and leave every other file as it is."
        ),
    )
    build.add_argument(
        "--out", default="mini_world", help="output directory (default: ./mini_world)"
    )
    build.add_argument("--seed", type=int, default=0, help="world seed (default: 0)")
    build.add_argument(
        "--world",
        choices=("v1", "v2"),
        default="v1",
        help="v1: the original world (assets/mini); v2: base models pretrained on worked "
        "examples too, a gentle replayed teacher SFT, 32-wide heads and a 2x student "
        "(assets/mini_v2; default: v1)",
    )
    build.add_argument(
        "--scale",
        choices=("quick", "full"),
        default="full",
        help="full: the shipped world (~10 min on 2 CPU cores); quick: a few steps, for plumbing",
    )
    build.add_argument(
        "--only",
        choices=("teacher_ft2",),
        default=None,
        help="build only this finetuned teacher into the existing world in --out "
        "(seed and settings from its world.json; the other models are not touched)",
    )
    build.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice; 1 is much faster on a busy machine)",
    )
    build.set_defaults(func=_build)


def _build(args: argparse.Namespace) -> int:
    import json

    from deltakd.data.mini import build_world

    if args.threads is not None:
        import torch

        from deltakd.errors import ConfigError

        if args.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {args.threads}; pass e.g. --threads 1")

        torch.set_num_threads(args.threads)
    if args.only:
        from deltakd.data.mini.build import build_role

        out = build_role(args.out, args.only)
    else:
        out = build_world(args.out, seed=args.seed, scale=args.scale, world=args.world)
    info = json.loads((out / "world.json").read_text())
    print(f"mini world written to {out}")
    for name, n in info.get("parameters", {}).items():
        print(f"  {name:12s} {n:>10,d} parameters")
    return 0
