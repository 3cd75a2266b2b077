"""`deltakd bench transport`: move one logits payload between two processes, four ways.

Paths, all measured in one run on the same payload (default 4 × 1024 × 151936 bf16, 1.24 GB):

- ``memcpy``: ``dst.copy_(src)`` inside one process into an already-touched buffer; the
  physical limit of moving these bytes once.
- ``shm``: what the teacher servers do. The receiver (this process) owns a shared-memory
  ring; per transfer it sends a small request over ZeroMQ naming a slot, the sender process
  copies its tensor into the slot (mapped once) and answers with a small header, and the
  receiver wraps the slot as a tensor (``torch.frombuffer``, no copy). One copy in total.
- ``shm_copy_out``: the same, but the receiver also copies the slot into private memory
  (the client's ``zero_copy=False``). Two copies.
- ``zmq_zero_copy``: the tensor's bytes as a ZeroMQ frame (``copy=False``) over ``ipc://``;
  the receiver wraps the received frame without a copy (the kernel socket copies remain).
- ``zmq_pickle``: the naive baseline, ``send_pyobj(tensor)`` / ``recv_pyobj()``.

Every timed transfer starts when the receiver asks and ends when it holds a usable tensor;
the median over ``--repeats`` (after one warm-up) is reported. memcpy and the two shm paths
are timed in turns (memcpy, shm, shm_copy_out, memcpy, ...) so that load from other
processes hits them alike. Each side copies with ``--threads`` torch threads (default 1). A
checksum of the received bytes is compared with the sender's once per path, outside the
timed region.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

PATHS = ("memcpy", "shm", "shm_copy_out", "zmq_zero_copy", "zmq_pickle")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, default=4, help="sequences (default 4)")
    parser.add_argument("--seq", type=int, default=1024, help="positions (default 1024)")
    parser.add_argument("--vocab", type=int, default=151936, help="vocabulary (default 151936)")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    parser.add_argument("--repeats", type=int, default=5, help="timed transfers per path")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per transfer")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads copying on each side (default 1: both processes and memcpy get "
        "the same single copy thread; 0 = torch's default)",
    )


def _checksum(t: Any) -> int:
    import torch

    from deltakd.references.wire import as_bytes

    b = as_bytes(t)
    return int(b[: b.numel() - b.numel() % 8].view(torch.int64).sum().item()) + int(
        b[b.numel() - b.numel() % 8 :].sum().item()
    )


def _sender(
    endpoint: str, shape: tuple[int, ...], dtype_name: str, timeout_ms: int, threads: int | None
) -> None:
    """The other process: makes the payload, then answers transfer requests until `stop`."""
    import pickle  # noqa: F401  (send_pyobj pickles; see the note in _receive_pickle)

    import torch
    import zmq

    from deltakd.references import wire
    from deltakd.references.shm import AttachedSegments

    if threads:
        torch.set_num_threads(threads)
    dtype = wire.dtype_from_name(dtype_name)
    g = torch.Generator().manual_seed(0)
    payload = torch.empty(shape, dtype=dtype)
    wire.as_bytes(payload).random_(0, 256, generator=g)  # in place: no temporary
    sock = zmq.Context.instance().socket(zmq.PAIR)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, timeout_ms)
    sock.connect(endpoint)
    segments = AttachedSegments()
    sock.send_multipart(wire.encode({"op": "ready", "checksum": _checksum(payload)}))
    try:
        while True:
            header, _ = wire.decode(sock.recv_multipart(copy=False))
            op = header["op"]
            if op == "stop":
                break
            if op == "shm":
                s = header["slot"]
                dest = segments.tensor(s["name"], s["offset"], s["capacity"], dtype, shape)
                dest.copy_(payload)
                del dest
                sock.send_multipart(wire.encode({"op": "done"}))
            elif op == "frame":
                spec = wire.tensor_spec("x", payload, where="frame")
                sock.send_multipart(
                    wire.encode({"op": "done", "t": spec}, [wire.tensor_buffer(payload)]),
                    copy=False,
                )
            elif op == "pickle":
                sock.send_pyobj(payload)
    finally:
        segments.close()
        sock.close(linger=0)


def _interleaved_medians(fns: dict[str, Any], repeats: int) -> dict[str, float]:
    """Median seconds of each function, timing them in turns (A B C A B C ...) so that load
    from other processes on the machine hits every path alike."""
    for fn in fns.values():
        fn()  # warm-up (first-touch page faults, mappings); the result is dropped at once
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            out = fn()
            times[name].append(time.perf_counter() - t0)
            del out  # frees the shared-memory slot for the next transfer
    return {name: statistics.median(ts) for name, ts in times.items()}


def _memcpy(shape: tuple[int, ...], dtype: Any) -> Any:
    """The physical limit: one copy inside this process into an already-touched buffer."""
    import torch

    src = torch.empty(shape, dtype=dtype)
    src.reshape(-1).view(torch.uint8).fill_(7)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def run(args: argparse.Namespace) -> int:
    import gc

    import torch
    import zmq

    from deltakd.references import wire
    from deltakd.references.shm import ShmRing, new_run_id

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = wire.wire_dtype(args.dtype)
    shape = (args.batch, args.seq, args.vocab)
    nbytes = wire.nbytes_of(dtype, shape)
    repeats = max(1, args.repeats)
    pickle_repeats = min(repeats, 3)  # the naive path is ~100x slower; 3 are plenty
    timeout_ms = int(args.timeout * 1000)
    print(
        f"payload: {args.batch} x {args.seq} x {args.vocab} {wire.dtype_name(dtype)} = "
        f"{nbytes / 1e9:.3f} GB; median of {repeats} transfers after 1 warm-up "
        f"({pickle_repeats} for pickle); "
        f"torch threads: {torch.get_num_threads()}; {os.cpu_count()} CPU core(s), load average "
        f"{os.getloadavg()[0]:.1f} (other processes slow the two-process paths most)",
        flush=True,
    )

    results: dict[str, float] = {}

    memcpy = _memcpy(shape, dtype)

    tmp = Path(tempfile.mkdtemp(prefix="deltakd-bench-"))
    endpoint = f"ipc://{tmp}/transport.sock"
    sock = zmq.Context.instance().socket(zmq.PAIR)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, timeout_ms)
    sock.bind(endpoint)
    proc = mp.get_context("spawn").Process(
        target=_sender,
        args=(endpoint, shape, wire.dtype_name(dtype), timeout_ms, args.threads),
        daemon=True,
    )
    proc.start()
    ring = ShmRing(new_run_id(), max_slots=1)
    try:
        try:
            ready, _ = wire.decode(sock.recv_multipart())
        except zmq.Again:
            raise RuntimeError(
                f"the sender process did not start within {args.timeout:g} s "
                f"(exit code {proc.exitcode}); lower --vocab/--seq or check free memory"
            ) from None
        expected = ready["checksum"]

        def via_shm(copy_out: bool) -> Any:
            slot = ring.lease(nbytes)
            s = {"name": slot.name, "offset": slot.offset, "capacity": slot.capacity}
            sock.send_multipart(wire.encode({"op": "shm", "slot": s}))
            wire.decode(sock.recv_multipart(copy=False))
            if copy_out:
                return ring.copy_out(slot, dtype, shape)
            return ring.view(slot, dtype, shape)

        def via_frame() -> Any:
            sock.send_multipart(wire.encode({"op": "frame"}))
            header, frames = wire.decode(sock.recv_multipart(copy=False))
            spec = header["t"]
            return wire.from_buffer(frames[0].buffer, wire.dtype_from_name(spec["dtype"]), shape)

        def via_pickle() -> Any:
            sock.send_multipart(wire.encode({"op": "pickle"}))
            # The naive baseline. Unpickling is only safe because the sender is this
            # benchmark's own child process sending its own bytes over a private ipc socket;
            # deltakd's transports never unpickle anything received.
            return sock.recv_pyobj()

        def check(name: str, got: Any) -> None:
            if _checksum(got) != expected or got.shape != shape or got.dtype != dtype:
                raise RuntimeError(f"{name}: received bytes differ from the sent payload")

        check("shm", via_shm(False))
        check("shm_copy_out", via_shm(True))
        # memcpy and the shm paths in turns: the comparison that matters is between them.
        results.update(
            _interleaved_medians(
                {
                    "memcpy": memcpy,
                    "shm": lambda: via_shm(False),
                    "shm_copy_out": lambda: via_shm(True),
                },
                repeats,
            )
        )
        del memcpy
        gc.collect()
        check("zmq_zero_copy", via_frame())
        results.update(_interleaved_medians({"zmq_zero_copy": via_frame}, repeats))
        gc.collect()
        check("zmq_pickle", via_pickle())
        gc.collect()
        results.update(_interleaved_medians({"zmq_pickle": via_pickle}, pickle_repeats))
        sock.send_multipart(wire.encode({"op": "stop"}))
    finally:
        ring.close()
        proc.join(10)
        if proc.is_alive():
            proc.kill()
        sock.close(linger=0)
        for p in tmp.iterdir():
            p.unlink(missing_ok=True)
        tmp.rmdir()

    gbps = {k: nbytes / v / 1e9 for k, v in results.items()}
    print(f"{'path':<15}{'seconds':>10}{'GB/s':>9}{'x memcpy':>10}{'x pickle':>10}")
    for name in PATHS:
        print(
            f"{name:<15}{results[name]:>10.4f}{gbps[name]:>9.2f}"
            f"{gbps[name] / gbps['memcpy']:>10.2f}{gbps[name] / gbps['zmq_pickle']:>10.1f}"
        )
    if getattr(args, "json", False):
        out = {
            "payload_bytes": nbytes,
            "shape": list(shape),
            "dtype": wire.dtype_name(dtype),
            "repeats": repeats,
            "pickle_repeats": pickle_repeats,
            "threads": torch.get_num_threads(),
            "load_average": round(os.getloadavg()[0], 2),
            "memcpy_gbps": round(gbps["memcpy"], 3),
            "shm_gbps": round(gbps["shm"], 3),
            "shm_copy_out_gbps": round(gbps["shm_copy_out"], 3),
            "zmq_zero_copy_gbps": round(gbps["zmq_zero_copy"], 3),
            "zmq_pickle_gbps": round(gbps["zmq_pickle"], 3),
            "shm_vs_memcpy": round(gbps["shm"] / gbps["memcpy"], 3),
            "shm_vs_pickle": round(gbps["shm"] / gbps["zmq_pickle"], 2),
        }
        print(json.dumps(out))
    return 0
