"""CUDA IPC between processes of one host: a GPU tensor crosses without touching the CPU.

The producer exports a CUDA tensor's allocation handle with torch's own reduction
(`torch.multiprocessing.reductions.reduce_tensor`); we send the handle's plain fields in the
msgpack header instead of pickling the reduction, and the consumer rebuilds a tensor that
aliases the producer's memory (`rebuild_cuda_tensor`).

Lifetime: torch counts consumer references in a shared counter and keeps freed producer
blocks in limbo while a consumer still maps them. On top of that the producer keeps every
exported tensor in `ExportedTensors` until the consumer sends a release for its request id
(the consumer copies the tensor into its own memory first), so a block is never reused while
the consumer reads it. Only works between processes that can see the same GPU(s).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

from deltakd.errors import ReferenceServerError
from deltakd.references.wire import dtype_from_name, dtype_name


def export_tensor(tensor: torch.Tensor) -> dict[str, Any]:
    """A msgpack-able handle for a CUDA tensor (the producer must keep `tensor` alive)."""
    if tensor.device.type != "cuda":
        raise ValueError("CUDA IPC needs a CUDA tensor")
    from torch.multiprocessing.reductions import reduce_tensor

    _rebuild, args = reduce_tensor(tensor)
    (
        _cls,
        size,
        stride,
        offset,
        _storage_cls,
        dtype,
        device,
        handle,
        storage_size_bytes,
        storage_offset_bytes,
        _requires_grad,
        ref_counter_handle,
        ref_counter_offset,
        event_handle,
        event_sync_required,
    ) = args
    return {
        "size": list(size),
        "stride": list(stride),
        "offset": int(offset),
        "dtype": dtype_name(dtype),
        "device": int(device),
        "handle": bytes(handle),
        "storage_size_bytes": int(storage_size_bytes),
        "storage_offset_bytes": int(storage_offset_bytes),
        "ref_counter_handle": bytes(ref_counter_handle),
        "ref_counter_offset": int(ref_counter_offset),
        "event_handle": None if event_handle is None else bytes(event_handle),
        "event_sync_required": bool(event_sync_required),
    }


def import_tensor(h: dict[str, Any]) -> torch.Tensor:
    """The producer's tensor, aliased (no copy) on this process's view of the same GPU."""
    if not torch.cuda.is_available():
        raise ReferenceServerError(
            "the server answered through CUDA IPC but this process sees no CUDA device; use "
            "transport 'shm' (same host, CPU) or 'frames'"
        )
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    return rebuild_cuda_tensor(
        torch.Tensor,
        torch.Size(h["size"]),
        tuple(h["stride"]),
        h["offset"],
        torch.storage.TypedStorage,
        dtype_from_name(h["dtype"]),
        h["device"],
        h["handle"],
        h["storage_size_bytes"],
        h["storage_offset_bytes"],
        False,
        h["ref_counter_handle"],
        h["ref_counter_offset"],
        h["event_handle"],
        h["event_sync_required"],
    )


def receive(h: dict[str, Any], device: torch.device | str | None = None) -> torch.Tensor:
    """Copy the producer's tensor into memory this process owns (on `device`, default the
    same GPU), so the producer may be told to release it right after."""
    shared = import_tensor(h)
    out = shared.to(device or shared.device, copy=True)
    torch.cuda.current_stream(out.device).synchronize()
    del shared
    return out


class ExportedTensors:
    """Producer side: exported tensors kept alive until their consumer releases them."""

    def __init__(self, limit: int = 16) -> None:
        self.limit = limit
        self._live: OrderedDict[int, torch.Tensor] = OrderedDict()

    def keep(self, rid: int, tensor: torch.Tensor) -> None:
        self._live[rid] = tensor
        while len(self._live) > self.limit:
            # A consumer that never releases; torch's limbo still guards the block.
            self._live.popitem(last=False)

    def release(self, rids: list[int]) -> None:
        for rid in rids:
            self._live.pop(int(rid), None)

    def __len__(self) -> int:
        return len(self._live)
