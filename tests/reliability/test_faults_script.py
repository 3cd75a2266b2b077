"""scripts/faults.py: its command line (default run) and a short run of every scenario (slow)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "faults.py"


def _run(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, env=env)  # fmt: skip


def test_help_lists_scenarios_and_bad_arguments_are_refused():
    out = _run("--help", timeout=60)
    assert out.returncode == 0
    for word in ("crash", "save", "servers", "orphan", "--time-limit", "--kills"):
        assert word in out.stdout
    bad = _run("--scenarios", "crash,meteor", timeout=60)
    assert bad.returncode == 2 and "unknown scenario(s) ['meteor']" in bad.stderr
    few = _run("--steps", "6", "--save-steps", "2", timeout=60)
    assert few.returncode == 2 and "--steps must be > 4 * --save-steps" in few.stderr


@pytest.mark.slow
@pytest.mark.parametrize("scenarios", ["crash,save", "servers,orphan"])
def test_short_fault_injection_run_passes(tmp_path, scenarios):
    out = _run("--scenarios", scenarios, "--steps", "9", "--save-steps", "2", "--kills", "2",
               "--out", str(tmp_path), "--time-limit", "560", timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "FAIL" not in out.stdout
    assert "checks passed" in out.stdout
