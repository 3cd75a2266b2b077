"""`deltakd demo`: the miniature world end to end, offline.

Until the mini world and trainer land, the demo runs a small smoke run of the loss library
and says so.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the miniature world end to end, offline")
    p.add_argument("--quick", action="store_true", help="fewer steps and test items")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from deltakd.losses import DIVERGENCES, delta_kd_loss

    print("deltakd demo: the miniature world is not built yet; running a loss smoke run instead.")
    torch.manual_seed(args.seed)
    n, v = 64, 1000
    student = torch.randn(n, v, requires_grad=True)
    refs = [torch.randn(n, v) for _ in range(3)]
    for divergence in DIVERGENCES:
        opt = torch.optim.SGD([student], lr=50.0)
        first = last = None
        for _ in range(20):
            loss = delta_kd_loss(student, *refs, alpha=1.0, divergence=divergence, chunk_size=16)
            opt.zero_grad()
            loss.backward()
            opt.step()
            first = loss.item() if first is None else first
            last = loss.item()
        print(f"  {divergence:5s} Delta-KD loss {first:.4f} -> {last:.4f}")
    return 0
