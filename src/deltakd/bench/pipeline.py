"""`deltakd bench pipeline`: training steps/s with references local vs from teacher servers.

Three runs of the same training (same data, seed, steps) on the mini world's models:

- ``local``: the frozen models live in the trainer and run inside each step;
- ``servers``: one `deltakd serve` process per role, the trainer asks when it needs a batch
  (prefetch disabled);
- ``servers_prefetch``: the same servers, the trainer asks for step k+1's batch before it
  trains on step k (the default).

With ``--real-shape`` it measures the paper's shapes instead (`deltakd.bench.pipeline_real`):
bytes per step for logits vs hidden-state replies, and the trainers' wait with two ranks
sharing one server vs one server per rank.

Servers are started once, before the two server runs, and their start-up is not timed. Each
run's figures skip its first step (warm-up): steps/s and the fraction of step time spent in
`fetch` waiting for references (``ref_wait_s`` from the trainer). Uses the shipped mini world
when present, else freshly initialised models of the mini world's shapes (speed only).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

MODES = ("local", "servers", "servers_prefetch")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    parser.add_argument("--batch", type=int, default=8, help="rows per step")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per row")
    parser.add_argument(
        "--method", choices=("delta_kd", "kd"), default="delta_kd", help="kd needs 1 server"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument(
        "--world",
        default=None,
        help="directory with tokenizer/, teacher_ft/, teacher_raw/, student_raw/ "
        "(default: the shipped mini world, else generated untrained models of its shapes)",
    )
    parser.add_argument("--transport", choices=("shm", "frame"), default="shm")
    real = parser.add_argument_group("--real-shape (see the module docstring)")
    real.add_argument(
        "--real-shape",
        action="store_true",
        help="Qwen2.5-7B / 1.5B shapes (hidden 3584 / 1536, vocab 152064 / 151936) with few "
        "layers: bytes on the wire for logits vs hidden states, and the trainers' wait with 2 "
        "ranks sharing one server vs a server per rank",
    )
    real.add_argument("--layers", type=int, default=1, help="decoder layers (--real-shape)")
    real.add_argument(
        "--intermediate",
        type=int,
        default=2048,
        help="MLP width of the 7B-shaped teacher (Qwen2.5-7B: 18944; shrunk for memory)",
    )
    real.add_argument(
        "--student-ms",
        type=float,
        default=None,
        help="the simulated student step (--real-shape; default: 1.2 x the server's forward "
        "time for both ranks' rows, i.e. servers somewhat faster than the student)",
    )
    real.add_argument(
        "--batch-window-ms", type=float, default=20.0, help="the shared server's batching window"
    )


def _world(arg: str | None, tmp: Path) -> Path:
    if arg:
        return Path(arg)
    try:
        from deltakd.data.mini import mini_world_dir

        return mini_world_dir()
    except Exception:
        pass
    from deltakd.data.mini.corpus import make_corpus
    from deltakd.data.mini.models import STUDENT, TEACHER, make_model
    from deltakd.data.mini.tokenizer import train_tokenizer

    root = tmp / "world"
    tok = train_tokenizer(make_corpus(seed=0, n_docs=300), root / "tokenizer")
    for role, shape, seed in (
        ("teacher_raw", TEACHER, 1),
        ("teacher_ft", TEACHER, 2),
        ("student_raw", STUDENT, 3),
    ):
        make_model(shape, tok, seed=seed).save_pretrained(root / role)
        tok.save_pretrained(root / role)
    return root


def _dataset(path: Path, rows: int) -> Path:
    from deltakd.data.mini.corpus import make_corpus

    with open(path, "w", encoding="utf-8") as fh:
        for doc in make_corpus(seed=1, n_docs=rows):
            words = doc.split()
            half = max(1, len(words) // 3)
            row = {"prompt": " ".join(words[:half]), "response": " ".join(words[half:])}
            fh.write(json.dumps(row) + "\n")
    return path


class _NoPrefetch:
    """Wraps a reference source so `prefetch` does nothing (requests go out in `fetch`)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.roles = inner.roles

    def prefetch(self, key: int, batch: Mapping[str, Any]) -> None:
        pass

    def fetch(self, key: int, batch: Mapping[str, Any]) -> Any:
        return self.inner.fetch(key, batch)

    def lm_heads(self) -> dict[str, Any]:
        return self.inner.lm_heads()

    def close(self) -> None:
        pass


def _step_timer() -> Any:
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.ends.append(time.perf_counter())

    return StepTimer()


def _figures(result: Any, timer: Any) -> dict[str, float]:
    waits = [h["ref_wait_s"] for h in result.history if "ref_wait_s" in h and "loss" in h]
    ends = timer.ends
    if len(ends) < 2 or len(waits) < len(ends):
        raise RuntimeError("too few steps logged; use --steps >= 2 (logging every step)")
    span = ends[-1] - ends[0]  # steps 2..N
    wait = sum(waits[1:])
    steps = len(ends) - 1
    return {
        "steps_per_s": steps / span,
        "step_s": span / steps,
        "wait_s_per_step": wait / steps,
        "wait_fraction": wait / span,
    }


def run(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="deltakd-bench-pipeline-"))
    try:
        if getattr(args, "real_shape", False):
            from deltakd.bench.pipeline_real import run_real_shape

            return run_real_shape(args, tmp)
        return _run(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run(args: argparse.Namespace, tmp: Path) -> int:
    from deltakd.references.client import from_settings
    from deltakd.references.local import LocalReferences
    from deltakd.train import load_config, train
    from deltakd.train.methods import get_method

    world = _world(args.world, tmp)
    data = _dataset(tmp / "train.jsonl", max(args.batch * (args.steps + 2), 16))
    base = {
        "method": args.method,
        "student_raw": str(world / "student_raw"),
        "teacher_ft": str(world / "teacher_ft"),
        "teacher_raw": str(world / "teacher_raw"),
        "tokenizer": str(world / "tokenizer"),
        "dataset": str(data),
        "max_length": args.max_length,
        "max_prompt_length": args.max_length // 2,
        "per_device_batch_size": args.batch,
        "max_steps": args.steps,
        "lr_scheduler": "constant",
        "logging_steps": 1,
        "save_steps": 0,
        "progress": False,
        "device": "cpu",
        "resume": "never",
        "shuffle": False,
        "seed": 0,
    }
    config = load_config(None, {**base, "output_dir": str(tmp / "probe")})
    roles = tuple(get_method(args.method).reference_roles(config))
    print(
        f"pipeline: {args.method} ({', '.join(roles)}), {args.steps} steps of {args.batch} rows "
        f"x {args.max_length} tokens, {args.threads} torch thread(s) per process, "
        f"{os.cpu_count()} CPU core(s), world {world}",
        flush=True,
    )

    results: dict[str, dict[str, float]] = {}

    def one(mode: str, refs: Any) -> None:
        timer = _step_timer()
        cfg = load_config(None, {**base, "output_dir": str(tmp / mode)})
        result = train(cfg, references=refs, callbacks=[timer])
        results[mode] = _figures(result, timer)
        print(f"  {mode}: {results[mode]}", flush=True)

    local = LocalReferences({r: str(world / r) for r in roles}, dtype="fp32", device="cpu")
    try:
        one("local", local)
    finally:
        local.close()
    del local

    t0 = time.perf_counter()
    servers = from_settings(
        {"threads": args.threads, "transport": args.transport, "dtype": "fp32"},
        {r: str(world / r) for r in roles},
    )
    print(f"  servers started in {time.perf_counter() - t0:.1f} s (not timed)", flush=True)
    try:
        one("servers", _NoPrefetch(servers))
        one("servers_prefetch", servers)
    finally:
        servers.close()

    print(f"{'mode':<18}{'steps/s':>9}{'s/step':>9}{'wait s/step':>13}{'wait %':>8}")
    for mode in MODES:
        r = results[mode]
        print(
            f"{mode:<18}{r['steps_per_s']:>9.2f}{r['step_s']:>9.3f}"
            f"{r['wait_s_per_step']:>13.3f}{100 * r['wait_fraction']:>8.1f}"
        )
    if getattr(args, "json", False):
        out: dict[str, Any] = {
            "method": args.method,
            "steps": args.steps,
            "batch": args.batch,
            "max_length": args.max_length,
            "threads": args.threads,
        }
        for mode in MODES:
            out[f"{mode}_steps_per_s"] = round(results[mode]["steps_per_s"], 4)
            out[f"{mode}_wait_fraction"] = round(results[mode]["wait_fraction"], 4)
        print(json.dumps(out))
    return 0
