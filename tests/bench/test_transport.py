"""`deltakd bench transport` runs end to end on a tiny payload and reports every path."""

from __future__ import annotations

import json

import pytest

from deltakd.cli import main
from deltakd.references import shm


def test_bench_transport_tiny_payload_prints_all_paths_and_json(
    capsys: pytest.CaptureFixture,
) -> None:
    before = set(shm.SHM_DIR.iterdir()) if shm.SHM_DIR.is_dir() else set()
    argv = ["bench", "transport", "--batch", "1", "--seq", "16", "--vocab", "1000"]
    assert main([*argv, "--repeats", "2", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert result["payload_bytes"] == 1 * 16 * 1000 * 2  # bf16 by default
    for key in ("memcpy_gbps", "shm_gbps", "zmq_zero_copy_gbps", "zmq_pickle_gbps"):
        assert result[key] > 0, key
    table = "\n".join(out[:-1])
    for path in ("memcpy", "shm", "zmq_zero_copy", "zmq_pickle"):
        assert f"\n{path} " in table
    after = set(shm.SHM_DIR.iterdir()) if shm.SHM_DIR.is_dir() else set()
    assert not [p for p in after - before if p.name.startswith(shm.SEGMENT_PREFIX)]
