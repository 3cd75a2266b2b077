"""`deltakd bench train`: end-to-end training tokens/s and peak memory; `--peers` adds TRL's
GKDTrainer and a naive `transformers.Trainer` Delta-KD beside deltakd
(`deltakd.bench.train_peers` holds the implementations and the conventions)."""

from __future__ import annotations

from deltakd.bench.train_peers import add_arguments, run

__all__ = ["add_arguments", "run"]
