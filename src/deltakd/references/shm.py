"""Shared-memory ring buffer for tensors moving between processes of one host.

The *receiver* owns the ring (the trainer, for teacher replies): it creates the segments,
leases a slot per request, and the sender (the server) writes its reply straight into the
slot. The receiver then wraps the slot with ``torch.frombuffer`` (no copy), so the payload is
copied exactly once, by the sender, which also casts to the wire dtype in the same pass.

Lifetimes:
- a slot is leased until every tensor viewing it is garbage-collected (or `release` is called);
- segment names are ``deltakd_<run id>_<owner pid>_<n>``; the owner removes them on normal
  exit, on SIGTERM and on SIGINT; `sweep_dead` removes the ones whose owner pid is dead (a
  SIGKILLed trainer) and runs when a ring is created;
- Python's resource tracker is kept out of it: on Python < 3.13 it would unlink a segment as
  soon as any process that merely *attached* it exits.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import signal
import threading
import uuid
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing import resource_tracker, shared_memory
from pathlib import Path
from typing import Any

import torch

from deltakd.errors import ReferenceServerError
from deltakd.references.wire import from_buffer, nbytes_of

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
SEGMENT_PREFIX = "deltakd_"
# Bytes left free in /dev/shm on top of a new segment, so we never fill it to the brim.
SHM_HEADROOM = 64 << 20
_NAME_RE = re.compile(r"^deltakd_([0-9a-z]+)_(\d+)_\d+$")


def new_run_id() -> str:
    return uuid.uuid4().hex[:8]


# ----------------------------------------------------------------------------------------------
# segments without the resource tracker


class _Segment(shared_memory.SharedMemory):
    """A SharedMemory that stays quiet when tensors still view it at garbage collection."""

    def __del__(self) -> None:
        try:  # noqa: SIM105 - contextlib may already be gone at interpreter shutdown
            self.close()
        except BufferError:
            pass  # the mapping is freed together with the last tensor viewing it


def _create(name: str, size: int) -> shared_memory.SharedMemory:
    shm = _Segment(name=name, create=True, size=size)
    _untrack(shm)
    return shm


def attach(name: str) -> shared_memory.SharedMemory:
    """Map an existing segment (the sender side); never unlinks it."""
    try:
        shm = _Segment(name=name, create=False)
    except FileNotFoundError:
        raise ReferenceServerError(
            f"shared-memory segment {name} does not exist (its owner exited or removed it); "
            "the trainer that sent this request is gone or restarted; it will resend"
        ) from None
    _untrack(shm)
    return shm


def _untrack(shm: shared_memory.SharedMemory) -> None:
    # Python < 3.13 registers every mapping with the resource tracker, which unlinks it when
    # *that* process exits (bpo-39959); we do our own cleanup instead.
    with contextlib.suppress(Exception):
        resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]


def _unlink(name: str) -> None:
    # SharedMemory.unlink() would also talk to the resource tracker (see _untrack).
    try:
        import _posixshmem  # CPython's module behind SharedMemory on POSIX

        _posixshmem.shm_unlink("/" + name.lstrip("/"))
    except FileNotFoundError:
        pass
    except ImportError:  # pragma: no cover - non-POSIX
        with contextlib.suppress(FileNotFoundError):
            shared_memory.SharedMemory(name=name).unlink()


def _close(shm: shared_memory.SharedMemory) -> None:
    # Tensors may still view the mapping; it is unmapped when the last of them is freed.
    with contextlib.suppress(BufferError):
        shm.close()


# ----------------------------------------------------------------------------------------------
# cleanup on exit and signals

_OWNED: set[str] = set()
_OWNED_LOCK = threading.Lock()
_HANDLERS_INSTALLED = False


def _register(name: str) -> None:
    with _OWNED_LOCK:
        _OWNED.add(name)
    _install_cleanup()


def _forget(name: str) -> None:
    with _OWNED_LOCK:
        _OWNED.discard(name)


def cleanup_owned() -> None:
    """Unlink every segment this process created and has not removed yet."""
    with _OWNED_LOCK:
        names = list(_OWNED)
        _OWNED.clear()
    for name in names:
        _unlink(name)


def _install_cleanup() -> None:
    global _HANDLERS_INSTALLED
    if _HANDLERS_INSTALLED:
        return
    _HANDLERS_INSTALLED = True
    atexit.register(cleanup_owned)
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread; atexit still applies
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)
        signal.signal(sig, _make_handler(sig, previous))


def _make_handler(sig: int, previous: Any) -> Any:
    def handler(signum: int, frame: Any) -> None:
        cleanup_owned()
        if callable(previous):
            previous(signum, frame)  # e.g. KeyboardInterrupt for SIGINT
        elif previous == signal.SIG_IGN:
            return
        else:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    return handler


# ----------------------------------------------------------------------------------------------
# free space and sweeping


def _free_shm_bytes() -> int | None:
    """Free bytes in /dev/shm, or None where there is no /dev/shm (macOS)."""
    if not SHM_DIR.is_dir():
        return None
    st = os.statvfs(SHM_DIR)
    return st.f_bavail * st.f_frsize


def check_shm_space(nbytes: int) -> None:
    """Raise a clear error when /dev/shm cannot hold ``nbytes`` more.

    A segment larger than the free space is created without complaint (tmpfs is sparse) and
    the first write past the end kills the process with SIGBUS, hence this check.
    """
    free = _free_shm_bytes()
    if free is None:
        return
    if nbytes + SHM_HEADROOM > free:
        raise ReferenceServerError(
            f"/dev/shm has {free / 2**20:.0f} MiB free but a shared-memory slot needs "
            f"{nbytes / 2**20:.0f} MiB (+{SHM_HEADROOM >> 20} MiB headroom). Fix: enlarge "
            "/dev/shm (docker: --shm-size=16g; Kubernetes: an emptyDir with medium: Memory), "
            "lower batch size / sequence length, send hidden states instead of logits "
            "(output: hidden), or use transport 'frames'"
        )


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_dead(run_id: str | None = None) -> list[str]:
    """Remove deltakd segments whose owner process is dead; returns the names removed.

    With ``run_id`` only that run's segments are considered.
    """
    if not SHM_DIR.is_dir():
        return []
    removed = []
    for entry in SHM_DIR.iterdir():
        m = _NAME_RE.match(entry.name)
        if not m or (run_id is not None and m.group(1) != run_id):
            continue
        if not pid_alive(int(m.group(2))):
            _unlink(entry.name)
            removed.append(entry.name)
    if removed:
        log.info("removed %d shared-memory segment(s) left by dead processes", len(removed))
    return removed


def segments(run_id: str) -> list[str]:
    """Names of this run's segments that currently exist in /dev/shm."""
    if not SHM_DIR.is_dir():
        return []
    return sorted(p.name for p in SHM_DIR.iterdir() if p.name.startswith(f"deltakd_{run_id}_"))


# ----------------------------------------------------------------------------------------------
# the ring


@dataclass
class Slot:
    """A leased region: the sender writes ``nbytes`` at ``offset`` of segment ``name``."""

    index: int
    name: str
    offset: int
    capacity: int


class ShmRing:
    """A set of reusable shared-memory slots owned by this process.

    Each slot is its own segment, created on first use and grown (recreated) when a request
    needs more bytes, so steady-state traffic never creates segments. At most ``max_slots``
    are leased at once; a lease beyond that raises (the caller keeps too many replies alive).
    """

    _counter = 0

    def __init__(self, run_id: str, max_slots: int = 8, *, sweep: bool = True) -> None:
        if not re.fullmatch(r"[0-9a-z]+", run_id):
            raise ValueError(f"run id must be lowercase alphanumeric, got {run_id!r}")
        self.run_id = run_id
        self.max_slots = max_slots
        self._segments: list[shared_memory.SharedMemory | None] = [None] * max_slots
        self._leased: list[bool] = [False] * max_slots
        self._lock = threading.Lock()
        self._closed = False
        if sweep:
            sweep_dead()

    def _new_name(self) -> str:
        ShmRing._counter += 1
        return f"{SEGMENT_PREFIX}{self.run_id}_{os.getpid()}_{ShmRing._counter}"

    def lease(self, nbytes: int) -> Slot:
        """Reserve a slot of at least ``nbytes``; free it with `release` or via `view`."""
        with self._lock:
            if self._closed:
                raise ReferenceServerError("shared-memory ring is closed; create a new client")
            free = [i for i, used in enumerate(self._leased) if not used]
            if not free:
                raise ReferenceServerError(
                    f"all {self.max_slots} shared-memory slots are in use: the caller keeps "
                    "references to earlier replies alive. Fix: drop old ReferenceBatch tensors "
                    "(or .clone() what you keep), or raise max_slots"
                )
            # Prefer a slot that is already big enough; else grow the first free one.
            fits = [i for i in free if self._capacity(i) >= nbytes]
            i = (fits or free)[0]
            if self._capacity(i) < nbytes:
                self._replace(i, nbytes)
            self._leased[i] = True
            seg = self._segments[i]
            assert seg is not None
            return Slot(i, seg.name, 0, seg.size)

    def _capacity(self, i: int) -> int:
        seg = self._segments[i]
        return -1 if seg is None else seg.size

    def _replace(self, i: int, nbytes: int) -> None:
        old = self._segments[i]
        if old is not None:
            _unlink(old.name)
            _forget(old.name)
            _close(old)
            self._segments[i] = None
        size = max(int(nbytes), 1)
        check_shm_space(size)
        name = self._new_name()
        _register(name)
        try:
            seg = _create(name, size)
        except BaseException:
            _forget(name)
            raise
        self._segments[i] = seg

    def release(self, slot: Slot) -> None:
        with self._lock:
            seg = self._segments[slot.index]
            if seg is not None and seg.name == slot.name:
                self._leased[slot.index] = False

    def view(self, slot: Slot, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
        """The slot's bytes as a tensor, without a copy. The slot stays leased until every
        tensor derived from this one is freed."""
        seg = self._segments[slot.index]
        if seg is None or seg.name != slot.name:
            raise ReferenceServerError(f"slot {slot.name} was recycled while still in use")
        n = nbytes_of(dtype, shape)
        if n > slot.capacity:
            raise ReferenceServerError(
                f"reply of {n} bytes does not fit its {slot.capacity}-byte slot; the server "
                "sent a different shape than requested"
            )
        # A fresh memoryview per lease: torch keeps it alive for as long as any tensor uses
        # the storage, so its finalizer fires exactly when the last view dies.
        mv = seg.buf[slot.offset : slot.offset + max(n, 1)]
        weakref.finalize(mv, self.release, slot)
        return from_buffer(mv, dtype, shape)

    def copy_out(self, slot: Slot, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
        """A private copy of the slot's bytes; the slot is free again when this returns."""
        try:
            seg = self._segments[slot.index]
            assert seg is not None
            src = from_buffer(seg.buf, dtype, shape, offset=slot.offset)
            out = src.clone()
            del src
            return out
        finally:
            self.release(slot)

    def names(self) -> list[str]:
        return [s.name for s in self._segments if s is not None]

    def close(self) -> None:
        """Unlink every segment (mappings live on while tensors still view them)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for i, seg in enumerate(self._segments):
                if seg is None:
                    continue
                _unlink(seg.name)
                _forget(seg.name)
                _close(seg)
                self._segments[i] = None

    def __del__(self) -> None:
        try:  # noqa: SIM105 - contextlib may already be gone at interpreter shutdown
            self.close()
        except Exception:
            pass  # interpreter shutdown; atexit cleanup covers the names


class AttachedSegments:
    """The sender's cache of mapped segments (maps each once; keeps at most ``limit``)."""

    def __init__(self, limit: int = 32) -> None:
        self.limit = limit
        self._maps: dict[str, shared_memory.SharedMemory] = {}

    def tensor(
        self, name: str, offset: int, capacity: int, dtype: torch.dtype, shape: Sequence[int]
    ) -> torch.Tensor:
        """A tensor that writes straight into segment ``name`` at ``offset``."""
        n = nbytes_of(dtype, shape)
        if n > capacity:
            raise ReferenceServerError(
                f"reply needs {n} bytes but the trainer's slot has {capacity}; the request's "
                "expected shape does not match this model (vocab or hidden size)"
            )
        seg = self._maps.get(name)
        if seg is None:
            if len(self._maps) >= self.limit:
                oldest = next(iter(self._maps))
                _close(self._maps.pop(oldest))
            seg = attach(name)
            self._maps[name] = seg
        if offset + n > seg.size:
            raise ReferenceServerError(f"segment {name} is smaller than the requested slot")
        return from_buffer(seg.buf, dtype, shape, offset=offset)

    def close(self) -> None:
        for seg in self._maps.values():
            _close(seg)
        self._maps.clear()
