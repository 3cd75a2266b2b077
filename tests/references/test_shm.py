"""Shared-memory lifetimes: nothing left in /dev/shm, clear errors when it is too small."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
from multiprocessing import shared_memory

import pytest
import torch

from deltakd.errors import ReferenceServerError
from deltakd.references import shm
from deltakd.references.shm import ShmRing, new_run_id

pytestmark = pytest.mark.skipif(not shm.SHM_DIR.is_dir(), reason="needs /dev/shm (Linux)")


def test_normal_close_leaves_no_segment() -> None:
    run = new_run_id()
    ring = ShmRing(run, max_slots=3)
    slots = [ring.lease(1000 * (i + 1)) for i in range(3)]
    assert len(shm.segments(run)) == 3
    views = [ring.view(s, torch.float32, (10,)) for s in slots]
    ring.close()
    assert shm.segments(run) == []
    assert views[0].sum().item() == 0.0  # still readable: unlinking only removed the name


def test_slot_is_reused_when_its_tensors_die_and_lease_beyond_limit_is_clear() -> None:
    ring = ShmRing(new_run_id(), max_slots=2)
    try:
        a = ring.view(ring.lease(64), torch.float32, (16,))
        b = ring.view(ring.lease(64), torch.float32, (16,))
        a_part = a[2:5]  # a derived view keeps the slot leased
        del a
        gc.collect()
        with pytest.raises(ReferenceServerError, match=r"slots are in use.*drop old"):
            ring.lease(64)
        del a_part, b
        gc.collect()
        names_before = ring.names()
        ring.lease(64)
        ring.lease(32)
        assert ring.names() == names_before  # steady state: no new segments
    finally:
        ring.close()


def test_dev_shm_too_small_gives_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shm, "_free_shm_bytes", lambda: 10 << 20)
    ring = ShmRing(new_run_id(), max_slots=1)
    try:
        with pytest.raises(ReferenceServerError, match=r"/dev/shm has 10 MiB free.*shm-size"):
            ring.lease(100 << 20)
        assert ring.names() == []  # nothing was created
    finally:
        ring.close()


_OWNER = textwrap.dedent(
    """
    import sys, time
    from deltakd.references.shm import ShmRing
    ring = ShmRing(sys.argv[1], max_slots=2)
    ring.lease(4096); ring.lease(8192)
    print("ready", flush=True)
    time.sleep(60)
    """
)


def _start_owners(n: int) -> list[tuple[str, subprocess.Popen[str]]]:
    """``n`` processes that each own two segments of their own run (started together: each
    pays the torch import, so they overlap)."""
    owners = []
    for _ in range(n):
        run = new_run_id()
        proc = subprocess.Popen(
            [sys.executable, "-c", _OWNER, run], stdout=subprocess.PIPE, text=True
        )
        owners.append((run, proc))
    for run, proc in owners:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        assert len(shm.segments(run)) == 2
    return owners


def test_segments_removed_on_sigterm_and_sigint_and_swept_after_sigkill() -> None:
    (term_run, term), (int_run, intr), (kill_run, killed) = _start_owners(3)
    term.send_signal(signal.SIGTERM)
    intr.send_signal(signal.SIGINT)
    killed.kill()  # SIGKILL: no handler runs, the names stay behind ...
    for proc in (term, intr, killed):
        proc.wait(20)
        assert proc.returncode != 0
    assert shm.segments(term_run) == []
    assert shm.segments(int_run) == []
    assert len(shm.segments(kill_run)) == 2
    live = shared_memory.SharedMemory(  # ... while a live owner's segment must survive
        name=f"deltakd_{kill_run}_{os.getpid()}_999", create=True, size=16
    )
    try:
        removed = shm.sweep_dead(kill_run)
        assert len(removed) == 2 and all(f"_{killed.pid}_" in n for n in removed)
        assert shm.segments(kill_run) == [live.name]
    finally:
        live.close()
        live.unlink()
    assert shm.segments(kill_run) == []


def test_sweep_runs_when_a_ring_is_created() -> None:
    run = new_run_id()
    proc = subprocess.Popen(["true"])
    proc.wait()
    dead_pid = proc.pid
    # A segment a SIGKILLed trainer left behind (its pid is dead).
    seg = shared_memory.SharedMemory(name=f"deltakd_{run}_{dead_pid}_1", create=True, size=16)
    seg.close()
    shm._untrack(seg)
    assert len(shm.segments(run)) == 1
    ShmRing(new_run_id()).close()
    assert shm.segments(run) == []
