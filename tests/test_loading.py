"""deltakd.loading: the one place for device choice."""

from __future__ import annotations

import pytest
import torch

from deltakd.loading import choose_device


def test_auto_is_the_cpu_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert choose_device("auto") == torch.device("cpu")
    assert choose_device(None) == torch.device("cpu")


@pytest.mark.parametrize(("local_rank", "expected"), [(None, 0), ("0", 0), ("3", 3), ("5", 1)])
def test_auto_takes_this_process_gpu(
    monkeypatch: pytest.MonkeyPatch, local_rank: str | None, expected: int
) -> None:
    # Under torchrun every rank must not land on cuda:0 (4 GPUs here, rank 5 wraps to 1).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    assert choose_device("auto") == torch.device("cuda", expected)


def test_an_explicit_device_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert choose_device("cpu") == torch.device("cpu")
    assert choose_device("cuda:2") == torch.device("cuda", 2)
