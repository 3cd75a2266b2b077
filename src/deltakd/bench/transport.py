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
the median over ``--repeats`` (after one warm-up) is reported. A checksum of the received
bytes is compared with the sender's once per path, outside the timed region.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
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


def _checksum(t: Any) -> int:
    import torch

    from deltakd.references.wire import as_bytes

    b = as_bytes(t)
    return int(b[: b.numel() - b.numel() % 8].view(torch.int64).sum().item()) + int(
        b[b.numel() - b.numel() % 8 :].sum().item()
    )


def _sender(endpoint: str, shape: tuple[int, ...], dtype_name: str, timeout_ms: int) -> None:
    """The other process: makes the payload, then answers transfer requests until `stop`."""
    import pickle  # noqa: F401  (send_pyobj pickles; see the note in _receive_pickle)

    import torch
    import zmq

    from deltakd.references import wire
    from deltakd.references.shm import AttachedSegments

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


def _median_seconds(fn: Any, repeats: int) -> float:
    fn()  # warm-up (first-touch page faults, mappings); the result is dropped at once
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        del out  # frees the shared-memory slot for the next transfer
    return statistics.median(times)


def _memcpy_seconds(shape: tuple[int, ...], dtype: Any, repeats: int) -> float:
    """The physical limit: one copy inside this process into an already-touched buffer."""
    import torch

    src = torch.empty(shape, dtype=dtype)
    src.fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    return _median_seconds(lambda: dst.copy_(src), repeats)


def run(args: argparse.Namespace) -> int:
    import gc

    import torch
    import zmq

    from deltakd.references import wire
    from deltakd.references.shm import ShmRing, new_run_id

    dtype = wire.wire_dtype(args.dtype)
    shape = (args.batch, args.seq, args.vocab)
    nbytes = wire.nbytes_of(dtype, shape)
    repeats = max(1, args.repeats)
    timeout_ms = int(args.timeout * 1000)
    print(
        f"payload: {args.batch} x {args.seq} x {args.vocab} {wire.dtype_name(dtype)} = "
        f"{nbytes / 1e9:.3f} GB; median of {repeats} transfers after 1 warm-up; "
        f"torch threads: {torch.get_num_threads()}",
        flush=True,
    )

    results: dict[str, float] = {}

    results["memcpy"] = _memcpy_seconds(shape, dtype, repeats)
    gc.collect()

    tmp = Path(tempfile.mkdtemp(prefix="deltakd-bench-"))
    endpoint = f"ipc://{tmp}/transport.sock"
    sock = zmq.Context.instance().socket(zmq.PAIR)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, timeout_ms)
    sock.bind(endpoint)
    proc = mp.get_context("spawn").Process(
        target=_sender, args=(endpoint, shape, wire.dtype_name(dtype), timeout_ms), daemon=True
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

        for name, fn in (
            ("shm", lambda: via_shm(False)),
            ("shm_copy_out", lambda: via_shm(True)),
            ("zmq_zero_copy", via_frame),
            ("zmq_pickle", via_pickle),
        ):
            got = fn()
            if _checksum(got) != expected or got.shape != shape or got.dtype != dtype:
                raise RuntimeError(f"{name}: received bytes differ from the sent payload")
            del got
            gc.collect()
            results[name] = _median_seconds(fn, repeats)
            gc.collect()
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
