"""Same-process A/B of `fused_distill_loss`: an older copy of fused.py against the working tree.

    git show REV:src/deltakd/losses/fused.py > /tmp/fused_old.py
    PYTHONPATH=src python scripts/fused_ab.py --old /tmp/fused_old.py --n 256 --vocab 151936 \\
        --hidden 1536 --chunk 256 --threads 2 --divergence jsd --repeats 3

Variants (`--variants`, comma-separated): `matmul` (the four N×H×V matmuls of single-teacher
KD alone), `delta_matmul` (six), `old`, `new`, `delta-old`, `delta-new` (three frozen references),
optionally with options after a colon: `new:sm=4` (softmax_chunk_size), `new:c=512`
(chunk_size). One warm-up call each, then `--repeats` rounds with the variants interleaved;
prints the median wall and process CPU time (CPU time is steadier on a shared machine) and each
as a ratio to the first variant. The old copy must import the same `deltakd.losses` helpers.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--old", required=True, help="path to an older copy of fused.py")
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--hidden", type=int, default=1536)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--divergence", default="jsd")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", default="matmul,old,new")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    spec = importlib.util.spec_from_file_location("fused_old", a.old)
    old = importlib.util.module_from_spec(spec)
    sys.modules["fused_old"] = old
    spec.loader.exec_module(old)
    from deltakd.losses import fused as new

    g = torch.Generator().manual_seed(0)
    n, v, h = a.n, a.vocab, a.hidden
    hs = torch.randn(n, h, generator=g).requires_grad_()
    ws = (torch.randn(v, h, generator=g) * h**-0.5 * 2).requires_grad_()
    refs = {r: (torch.randn(n, h, generator=g), torch.randn(v, h, generator=g) * h**-0.5 * 2)
            for r in ("teacher_ft", "teacher_raw", "student_raw")}  # fmt: skip

    def matmuls(k: int):
        def f():
            with torch.no_grad():
                for _ in range(k):
                    hs @ ws.t()  # (N, V)
                z = refs["teacher_ft"][0] @ ws.t()
                z @ ws  # (N, H)
                z.t() @ hs  # (V, H)

        return f

    def loss(spec_: str):
        name, _, opts = spec_.partition(":")
        keys = {"sm": "softmax_chunk_size", "c": "chunk_size"}
        kw = {keys[k]: int(x) for k, x in (o.split("=") for o in opts.split(";") if o)}
        kw.setdefault("chunk_size", a.chunk)
        mod = old if name.endswith("old") else new
        delta = name.startswith("delta")
        frozen = refs if delta else {"teacher_ft": refs["teacher_ft"]}
        extra = {} if delta else {"variant": None, "beta": 0.5}

        def f():
            hs.grad = ws.grad = None
            out = mod.fused_distill_loss(hs, ws, frozen, divergence=a.divergence, **extra, **kw)
            out.backward()
            return out.item()

        return f

    names = a.variants.split(",")
    fns = {x: matmuls(1) if x == "matmul" else matmuls(3) if x == "delta_matmul" else loss(x)
           for x in names}  # fmt: skip
    values = {k: f() for k, f in fns.items()}
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(a.repeats):
        for k, f in fns.items():
            t, c = time.perf_counter(), time.process_time()
            f()
            wall[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
    print(f"N={n} V={v} H={h} chunk={a.chunk} threads={a.threads} {a.divergence} "
          f"median of {a.repeats}")  # fmt: skip
    w0, c0 = statistics.median(wall[names[0]]), statistics.median(cpu[names[0]])
    for k in fns:
        w, c = statistics.median(wall[k]), statistics.median(cpu[k])
        print(f"{k:20s} wall {w:8.3f} s ({w / w0:.3f})  cpu {c:8.3f} s ({c / c0:.3f})  "
              f"loss {values[k]}")  # fmt: skip


if __name__ == "__main__":
    main()
