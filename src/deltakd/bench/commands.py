"""`deltakd bench NAME`: each benchmark is a module `deltakd.bench.<NAME>` with
`add_arguments(parser)` and `run(args) -> int`. Benchmarks print figures side by side from one
run (ratios against a baseline measured in the same process) and, with `--json`, end with one
line of JSON.
"""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS: dict[str, str] = {
    "loss": "Delta-KD loss forward+backward: naive vs chunked vs fused from hidden states",
    "transport": "moving a logits payload: memcpy vs shared memory vs ZeroMQ frames vs pickle",
    "pipeline": "mini-world steps/s with local references, servers, servers + prefetch",
    "cache": "offline sparse target cache: bytes/token, KL to dense, throughput",
    "precision": "Delta-KD target with bf16 references: KL to the exact target per setting",
    "generate": "generation: hf vs vLLM tokens/s, time to first reply, peak memory",
    "train": "end-to-end training tokens/s and peak memory; --peers: beside TRL GKD and a naive "
    "transformers.Trainer",
}


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("bench", help="benchmarks (figures side by side from one run)")
    names = parser.add_subparsers(dest="bench", metavar="NAME", required=True)
    for name, help_text in BENCHMARKS.items():
        module = importlib.import_module(f"deltakd.bench.{name}")
        p = names.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--json", action="store_true", help="end with one line of JSON")
        module.add_arguments(p)
        p.set_defaults(func=module.run)
