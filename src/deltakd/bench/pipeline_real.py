"""`deltakd bench pipeline --real-shape`: teacher servers at Qwen2.5-7B → 1.5B shapes.

Models: random Qwen2 configs with the real hidden sizes and vocabulary rows — teacher
hidden 3584 / vocab 152,064 (Qwen2.5-7B), student hidden 1536 / vocab 151,936 (Qwen2.5-1.5B) —
with `--layers` decoder layers and, for memory, the teacher's MLP shrunk to `--intermediate`
(18,944 in the real model) and its lm_head tied to its embeddings (one 152,064 × 3,584 matrix
instead of two; the 1.5B model is tied anyway). Weights in bf16, bf16 on the wire.

1. **Bytes on the wire**: a launched server answering logits, then one answering hidden
   states (the same teacher), one batch of `--batch` × `--max-length` tokens: the reply bytes per
   step and their ratio.
2. **Trainer wait**: two trainer processes (ranks 0 and 1, `LOCAL_RANK`) each run
   `--steps` steps of prefetch(k+1) → fetch(k) → student step, against (a) one server shared
   by both (`placement: shared`, launched by rank 0, `batch_window_ms`) and (b) one server per
   rank (`placement: per_rank`). The student step is *simulated* as `--student-ms` of idle
   time, as a GPU step leaves the CPUs to the servers; by default 1.2 × the shared server's
   time for both ranks' rows (servers somewhat faster than the student, the target's
   condition). Reported: the fraction of each rank's step time spent waiting in `fetch`
   (first step excluded).

On a CPU-only machine this measures the pipeline (overlap, batching, transport), not GPU
placement or CUDA IPC.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
from pathlib import Path
from typing import Any

TEACHER = {"hidden_size": 3584, "vocab_size": 152_064, "heads": 28, "kv_heads": 4}
STUDENT = {"hidden_size": 1536, "vocab_size": 151_936, "heads": 12, "kv_heads": 2}


def _make_teacher(out: Path, layers: int, intermediate: int) -> Path:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=TEACHER["vocab_size"],
        hidden_size=TEACHER["hidden_size"],
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=TEACHER["heads"],
        num_key_value_heads=TEACHER["kv_heads"],
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: no fp32 copy of 545M params
    try:
        model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(out)
    del model
    return out


def _batch(seed: int, rows: int, length: int) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 151_665, (rows, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _rank(
    rank: int, teacher: str, placement: str, settings: dict[str, Any], out: Any, barrier: Any
) -> None:
    os.environ["LOCAL_RANK"] = str(rank)
    import torch

    from deltakd.references.client import ServerReferences, ServerSpec

    torch.set_num_threads(1)
    spec = ServerSpec(
        "teacher_ft",
        model=teacher,
        output="hidden",
        dtype="bf16",
        model_dtype="bf16",
        batch_window_ms=settings["batch_window_ms"] if placement == "shared" else None,
    )
    refs = ServerReferences(
        [spec],
        placement=placement,
        run_id=settings["run_id"] if placement == "shared" else None,
        threads=settings["threads"],
        timeout=600,
        start_timeout=600,
    )
    try:
        steps, rows, length = settings["steps"], settings["batch"], settings["max_length"]
        batches = [_batch(100 * rank + k, rows, length) for k in range(steps)]
        barrier.wait()
        refs.prefetch(0, batches[0])
        waits, ends = [], []
        for k in range(steps):
            t0 = time.perf_counter()
            refs.fetch(k, batches[k])
            waits.append(time.perf_counter() - t0)
            if k + 1 < steps:
                refs.prefetch(k + 1, batches[k + 1])
            time.sleep(settings["student_s"])  # the student's step (on its accelerator)
            ends.append(time.perf_counter())
        span = ends[-1] - ends[0]
        out.put(
            {"rank": rank, "wait_fraction": sum(waits[1:]) / span, "step_s": span / (steps - 1)}
        )
        barrier.wait()  # rank 0 stops a shared server only when rank 1 is done
    finally:
        refs.close()


def _placement_run(teacher: str, placement: str, settings: dict[str, Any]) -> list[dict]:
    ctx = mp.get_context("spawn")
    out, barrier = ctx.Queue(), ctx.Barrier(2)
    procs = [
        ctx.Process(target=_rank, args=(r, teacher, placement, settings, out, barrier))
        for r in (0, 1)
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=1800) for _ in procs]
    for p in procs:
        p.join(60)
    return sorted(results, key=lambda r: r["rank"])


def run_real_shape(args: argparse.Namespace, tmp: Path) -> int:
    from deltakd.references.client import ServerReferences, ServerSpec

    if args.steps < 3:
        raise SystemExit("--real-shape needs --steps >= 3")
    t0 = time.perf_counter()
    teacher = str(_make_teacher(tmp / "teacher", args.layers, args.intermediate))
    rows, length = args.batch, args.max_length
    print(
        f"pipeline --real-shape: teacher hidden {TEACHER['hidden_size']}, vocab "
        f"{TEACHER['vocab_size']}, {args.layers} layer(s), MLP {args.intermediate}, tied head, "
        f"bf16 (built in {time.perf_counter() - t0:.0f} s); {rows} rows x {length} tokens per "
        f"rank and step; {args.threads} torch thread(s) per server; {os.cpu_count()} CPU "
        "core(s)",
        flush=True,
    )
    # 1. bytes on the wire: the same teacher answering logits and hidden states.
    logits_spec = ServerSpec("teacher_ft", model=teacher, output="logits", model_dtype="bf16")
    hidden_spec = ServerSpec("teacher_ft", model=teacher, output="hidden", model_dtype="bf16")
    kw = {"threads": args.threads, "start_timeout": 900, "timeout": 900}
    with ServerReferences([logits_spec], **kw) as as_logits:
        batch = _batch(0, rows, length)
        logits_bytes = as_logits.fetch(0, batch).logits["teacher_ft"].nbytes
    with ServerReferences([hidden_spec], **kw) as as_hidden:
        hidden_bytes = as_hidden.fetch(0, batch).hidden["teacher_ft"].nbytes
        as_hidden.fetch(1, _batch(1, 2 * rows, length))  # warm-up at the shared batch size
        t1 = time.perf_counter()
        as_hidden.fetch(2, _batch(2, 2 * rows, length))
        both_s = time.perf_counter() - t1
    request_bytes = 2 * rows * length * 8  # int64 ids + mask
    ratio = logits_bytes / hidden_bytes
    print(
        f"  reply bytes per step and role: logits {logits_bytes / 2**20:.2f} MiB, hidden "
        f"{hidden_bytes / 2**20:.3f} MiB ({ratio:.1f}x fewer); request {request_bytes} B",
        flush=True,
    )
    student_s = (args.student_ms / 1000) if args.student_ms else 1.2 * both_s
    print(
        f"  server forward for both ranks' rows ({2 * rows} x {length}): {both_s:.3f} s; "
        f"simulated student step {student_s:.3f} s",
        flush=True,
    )
    # 2. trainer wait: two ranks sharing one server vs a server each.
    settings = {
        "steps": args.steps,
        "batch": rows,
        "max_length": length,
        "threads": args.threads,
        "student_s": student_s,
        "batch_window_ms": args.batch_window_ms,
        "run_id": f"bench{os.getpid()}",
    }
    results = {}
    for placement in ("shared", "per_rank"):
        results[placement] = _placement_run(teacher, placement, settings)
        for r in results[placement]:
            print(
                f"  {placement:<9} rank {r['rank']}: wait {100 * r['wait_fraction']:.1f} % of "
                f"{r['step_s']:.3f} s/step",
                flush=True,
            )
    if getattr(args, "json", False):
        print(
            json.dumps(
                {
                    "logits_bytes": logits_bytes,
                    "hidden_bytes": hidden_bytes,
                    "ratio": round(ratio, 2),
                    "student_s": round(student_s, 4),
                    "server_both_ranks_s": round(both_s, 4),
                    **{
                        f"{p}_wait_fraction_rank{r['rank']}": round(r["wait_fraction"], 4)
                        for p, rs in results.items()
                        for r in rs
                    },
                }
            )
        )
    return 0
