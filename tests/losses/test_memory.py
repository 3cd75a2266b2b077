"""`chunk_size` really bounds memory: no op creates an [N, V] tensor except the gradient."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from deltakd.losses import delta_kd_loss, kd_loss

N, V, CHUNK = 96, 40, 8


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (tuple, list)):
        for item in x:
            yield from _tensors(item)
    elif isinstance(x, dict):
        for item in x.values():
            yield from _tensors(item)


class _Sizes(TorchDispatchMode):
    """Records (op, elements) of every NEW storage an op allocates while active.

    Views and detaches share their input's storage and are not counted.
    """

    def __init__(self):
        super().__init__()
        self.outputs: list[tuple[str, int]] = []
        self._seen: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for t in _tensors((args, kwargs)):
            self._seen.add(t.untyped_storage().data_ptr())
        out = func(*args, **(kwargs or {}))
        for t in _tensors(out):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in self._seen:
                self._seen.add(ptr)
                self.outputs.append((str(func), t.untyped_storage().nbytes() // 4))
        return out


def _large(fn):
    mode = _Sizes()
    with mode:
        fn()
    return [(op, n) for op, n in mode.outputs if n > CHUNK * V * 4]


def test_chunked_delta_kd_allocates_only_the_student_gradient_at_full_size():
    s = torch.randn(N, V, requires_grad=True)
    refs = [torch.randn(N, V) for _ in range(3)]
    mask = torch.rand(N) > 0.2

    def run():
        delta_kd_loss(s, *refs, alpha=0.5, mask=mask, chunk_size=CHUNK).backward()

    large = _large(run)
    # One buffer for the student's gradient; nothing else scales with N (no z*, no softmax).
    assert len(large) == 1, large
    assert "zeros_like" in large[0][0]


def test_unchunked_loss_does_allocate_full_size_intermediates():
    # The probe itself can fail: without chunking, softmax intermediates are [N, V].
    s = torch.randn(N, V, requires_grad=True)
    t = torch.randn(N, V)
    large = _large(lambda: kd_loss(s, t).backward())
    assert len(large) > 3
