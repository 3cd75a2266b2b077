"""Dependency floors: declared in pyproject.toml and checked at import with a clear message."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from deltakd._requirements import FLOORS, check_requirements

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_old_transformers_is_refused_with_the_fix() -> None:
    with pytest.raises(ImportError, match=r"transformers>=5\.19\.0.*4\.56\.0 is installed.*pip"):
        check_requirements(lambda name: "4.56.0" if name == "transformers" else "99.0")
    with pytest.raises(ImportError, match=r"5\.18\.2"):
        check_requirements(lambda name: "5.18.2")
    check_requirements(lambda name: "5.19.0")  # the floor itself runs
    check_requirements(lambda name: "5.19.0rc1")  # a pre-release of the floor's release too
    check_requirements(lambda name: "5.24.0.dev0")


def test_pyproject_declares_the_checked_floor_and_a_torch_range() -> None:
    text = PYPROJECT.read_text()
    floor = FLOORS["transformers"][0].rsplit(".0", 1)[0]
    assert f'"transformers>={floor},<6"' in text
    # torch is a range (a user's CUDA build stays), never an exact pin in the metadata ...
    torch_req = re.search(r'"(torch[^"]*)"', text).group(1)
    assert "==" not in torch_req and ">=" in torch_req and "<" in torch_req
    # ... while the Makefile installs the exact CPU wheel for development first.
    assert "pip install -q torch==2.13.0" in (PYPROJECT.parent / "Makefile").read_text()
    assert '"math-verify>=' in text
