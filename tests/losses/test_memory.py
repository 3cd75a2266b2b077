"""`chunk_size` really bounds memory: no op creates an [N, V] tensor except the gradient."""

from __future__ import annotations

import pytest
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

    Outputs that share a storage with one of the op's inputs (views, detaches, in-place ops)
    are not counted. Comparing with this op's inputs only (not with every storage seen so far)
    keeps a new allocation that reuses a freed block's address from going unnoticed.
    """

    def __init__(self):
        super().__init__()
        self.outputs: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs))}
        out = func(*args, **(kwargs or {}))
        counted: set[int] = set()
        for t in _tensors(out):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in inputs and ptr not in counted:
                counted.add(ptr)
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
    # `s` is a leaf: the loss hands that buffer over, so it becomes s.grad without a copy
    # (issue 19: it used to be cloned, 2 × [N, V]).
    assert [op for op, _ in large] == ["aten.zeros.default"], large
    expected = torch.autograd.grad(delta_kd_loss(s, *refs, alpha=0.5, mask=mask), s)[0]
    torch.testing.assert_close(s.grad, expected)


def test_chunked_loss_repeated_backward_after_handing_the_buffer_over():
    # retain_graph: the second backward recomputes the handed-over gradient, scaled anew.
    s = torch.randn(N, V, requires_grad=True)
    refs = [torch.randn(N, V) for _ in range(3)]
    mask = torch.rand(N) > 0.2
    expected = torch.autograd.grad(delta_kd_loss(s, *refs, mask=mask), s)[0]
    loss = delta_kd_loss(s, *refs, mask=mask, chunk_size=CHUNK)
    (2.0 * loss).backward(retain_graph=True)
    torch.testing.assert_close(s.grad, 2.0 * expected)
    first = s.grad
    (3.0 * loss).backward(retain_graph=True)
    torch.testing.assert_close(s.grad, 5.0 * expected)
    (0.0 * loss).backward()
    torch.testing.assert_close(s.grad, 5.0 * expected)
    del first
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()  # the graph is freed: no silent reuse of the handed-over buffer


def test_chunked_loss_reads_sliced_logits_without_copying_them():
    # The trainer passes views like logits[:, :-1, :V] (not viewable as (N, V)); reading them
    # row by row must not copy any input whole. Full-size allocations left: the student's
    # gradient buffer and autograd's own backward of the user's slicing.
    b, t, v_pad = 4, 25, 48
    full = torch.randn(b, t, v_pad, requires_grad=True)
    refs_full = [torch.randn(b, t, v_pad) for _ in range(3)]
    mask = torch.rand(b, t - 1) > 0.2

    def run():
        s = full[:, :-1, :V]
        refs = [r[:, :-1, :V] for r in refs_full]
        delta_kd_loss(s, *refs, alpha=0.5, mask=mask, chunk_size=CHUNK).backward()

    large = _large(run)
    assert not [op for op, _ in large if "clone" in op or "copy" in op], large
    assert sum("zeros" in op for op, _ in large) == 1, large
    assert all("zeros" in op or "slice_backward" in op for op, _ in large), large
    # Same value and gradient as the contiguous inputs.
    full.grad = None
    s = full[:, :-1, :V]
    refs = [r[:, :-1, :V] for r in refs_full]
    a = delta_kd_loss(s, *refs, alpha=0.5, mask=mask, chunk_size=CHUNK)
    (ga,) = torch.autograd.grad(a, full)
    c = full[:, :-1, :V].contiguous()
    b_ = delta_kd_loss(c, *[r.contiguous() for r in refs], alpha=0.5, mask=mask)
    (gb,) = torch.autograd.grad(b_, full)
    torch.testing.assert_close(a, b_)
    torch.testing.assert_close(ga, gb)


def test_unchunked_loss_does_allocate_full_size_intermediates():
    # The probe itself can fail: without chunking, softmax intermediates are [N, V].
    s = torch.randn(N, V, requires_grad=True)
    t = torch.randn(N, V)
    large = _large(lambda: kd_loss(s, t).backward())
    assert len(large) > 3
