"""Token-level distillation losses: `kd_loss`, `delta_kd_loss`, `parallelogram_loss`.

Conventions (docs/ARCHITECTURE.md §7): logits are `[..., V]` with any leading shape and any float dtype;
math runs in float32 (float64 stays float64). `mask` is a bool tensor of the leading shape where
True counts. The loss is the mean over counted positions (`reduction="mean"`) or their sum
(`reduction="sum"`, for callers that normalise over a whole accumulated batch). Nothing counted
gives 0.0 with a zero gradient.

`chunk_size` bounds memory. With it set, the loss runs through `_ChunkedLoss`, an autograd
Function that walks the counted positions `chunk_size` at a time and computes each chunk's
gradient during the forward pass (the approach of Liger-Kernel's chunked losses), so the peak
extra memory is the gradient of the inputs that need one plus O(chunk_size × V) — no autograd
graph over [N, V] is kept, and a target combined from several roles (Delta-KD's z*) is only
ever built one chunk at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import torch

from deltakd.losses import closed_form
from deltakd.losses.divergences import (
    check_divergence_args,
    compute_dtype,
    per_position_divergence,
)
from deltakd.losses.sparse import SparseTarget, sparse_fkl_per_position
from deltakd.losses.targets import _check_same_shape, floor_logprobs, get_variant, variant_terms

Reduction = Literal["mean", "sum"]
# Per-chunk loss: (student chunk (n, V), [term chunks]) -> per-position loss (n,).
ChunkFn = Callable[[torch.Tensor, Sequence[torch.Tensor]], torch.Tensor]


def _combined_fn(
    weights: Sequence[float],
    divergence: str,
    tau: float,
    beta: float,
    floored: Sequence[bool] = (),
    floor: float | None = None,
) -> ChunkFn:
    """Loss of the student against the target Σ w_i · term_i, where a term flagged in
    `floored` enters as `floor_logprobs(term, floor, τ)` (robust Delta-KD)."""
    flags = list(floored) if floor is not None else []
    flags += [False] * (len(weights) - len(flags))

    def fn(student: torch.Tensor, terms: Sequence[torch.Tensor]) -> torch.Tensor:
        dtype = compute_dtype(student, *terms)
        target = sum(
            w * (floor_logprobs(t.to(dtype), floor, tau) if f else t.to(dtype))  # type: ignore[arg-type]
            for w, t, f in zip(weights, terms, flags)
        )
        return per_position_divergence(student, target, divergence, tau, beta)

    # Read by `_ChunkedLoss`: with frozen terms, a closed-form gradient (losses.closed_form).
    # That form sums the weighted terms as they are, so a floored target keeps autograd.
    if not any(flags):
        fn.combined = (tuple(weights), divergence, tau, beta)  # type: ignore[attr-defined]
    return fn


def _sparse_fn(tau: float, basis: torch.Tensor | None, offset: torch.Tensor | None) -> ChunkFn:
    """Per-position terms: indices, logprobs, tail mass[, tail-model coefficients]."""

    def fn(student: torch.Tensor, terms: Sequence[torch.Tensor]) -> torch.Tensor:
        indices, logprobs, tail, *coeffs = terms
        return sparse_fkl_per_position(
            student, indices, logprobs, tail, tau,
            tail_coeffs=coeffs[0] if coeffs else None, tail_basis=basis, tail_offset=offset,
        )  # fmt: skip

    return fn


def _flat(x: torch.Tensor, lead: torch.Size) -> torch.Tensor | None:
    """`x` as (N, ...) without copying, or None when its strides do not allow that (a slice
    such as `logits[:, :-1, :V]`). Decided from the strides: a failed `view` raises, and
    building that exception costs more than the loss of a small chunk."""
    n = len(lead)
    sizes, strides = x.shape[:n], x.stride()[:n]
    expected = None
    for size, stride in zip(reversed(sizes), reversed(strides)):
        if size == 1:
            continue
        if expected is not None and stride != expected:
            return None
        expected = stride * size
    return x.view(lead.numel(), *x.shape[n:])


class _Rows:
    """The counted positions `rows` (flat over `lead`), readable from any `[*lead, ...]` input:
    through an (N, ...) view when the layout allows, else by per-dimension coordinates
    (computed once), so a sliced input such as `logits[:, :-1, :V]` is never copied whole."""

    def __init__(self, rows: torch.Tensor, lead: torch.Size) -> None:
        self.rows, self.lead = rows, lead
        self._coords: tuple[torch.Tensor, ...] | None = None

    def take(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows `rows[start:stop]` of `x` → (n, ...)."""
        flat = _flat(x, self.lead)
        if flat is not None:
            return flat.index_select(0, self.rows[start:stop])
        if self._coords is None:
            self._coords = torch.unravel_index(self.rows, tuple(self.lead))
        return x[tuple(c[start:stop] for c in self._coords)]


class _ChunkedLoss(torch.autograd.Function):
    """Σ over `rows` of `fn(student[rows], [t[rows] for t in terms])`, chunk by chunk.

    Inputs keep their shape `[*lead, ...]` (a sliced, non-contiguous view is read row by row,
    never copied whole); `rows` are the counted positions, flat over `lead`. Gradients of every
    input that needs one are accumulated into one buffer per input during forward; backward
    scales them by the incoming gradient in place and hands them over, so memory stays bounded.

    Handing over: the buffers are saved tensors, not ctx attributes. Without retain_graph
    autograd releases them as soon as backward returns, before the gradient is accumulated, so
    a leaf input's `.grad` takes the buffer itself instead of a clone (one [N, V] tensor, not
    two). With retain_graph they stay saved, autograd clones them into `.grad`, and the next
    backward rescales them (`ctx.scale` is the factor they carry).
    """

    @staticmethod
    def forward(ctx, rows, fn, chunk_size, lead, student, *terms):  # type: ignore[override]
        reader = _Rows(rows, lead)
        inputs = (student, *terms)
        needs = ctx.needs_input_grad[4:]
        # Rows outside `rows` keep a zero gradient; when every row counts, all are written.
        new = torch.empty if rows.numel() == lead.numel() else torch.zeros
        grads = [
            new(x.shape, dtype=x.dtype, device=x.device) if need else None
            for x, need in zip(inputs, needs)
        ]
        flat_grads = [None if g is None else g.view(lead.numel(), *g.shape[len(lead) :])
                      for g in grads]  # fmt: skip
        total = torch.zeros((), dtype=compute_dtype(student), device=student.device)
        combined = getattr(fn, "combined", None)
        if (
            combined is not None
            and not any(needs[1:])
            and closed_form.supports(combined[1], combined[2], False)
        ):
            scale = _closed_form_chunks(reader, rows, chunk_size, lead, fn, combined, inputs,
                                        flat_grads[0], needs[0], total)  # fmt: skip
            ctx.has_grad = [g is not None for g in grads]
            ctx.save_for_backward(*[g for g in grads if g is not None])
            # The buffer holds the gradient / scale: backward's rescale multiplies it back.
            ctx.scale = torch.full((), 1.0 / scale, dtype=total.dtype, device=total.device)
            return total
        for start in range(0, rows.numel(), chunk_size):
            idx = rows[start : start + chunk_size]
            with torch.enable_grad():
                leaves = [
                    reader.take(x, start, start + chunk_size).detach().requires_grad_(need)
                    for x, need in zip(inputs, needs)
                ]
                loss = fn(leaves[0], leaves[1:]).sum()
            wanted = [leaf for leaf, need in zip(leaves, needs) if need]
            if wanted:
                chunk_grads = iter(torch.autograd.grad(loss, wanted))
                for buffer, need in zip(flat_grads, needs):
                    if need:
                        buffer.index_copy_(0, idx, next(chunk_grads))
            total += loss.detach()
        ctx.has_grad = [g is not None for g in grads]
        ctx.save_for_backward(*[g for g in grads if g is not None])
        ctx.scale = torch.ones((), dtype=total.dtype, device=total.device)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):  # type: ignore[override]
        saved = iter(ctx.saved_tensors)  # raises on a second backward without retain_graph
        grads = [next(saved) if has else None for has in ctx.has_grad]
        if not bool(grad_output):  # zero incoming gradient: buffers untouched, stride-0 zeros
            zeros = [None if g is None else g.new_zeros(()).expand_as(g) for g in grads]
            return (None, None, None, None, *zeros)
        if not torch.equal(grad_output, ctx.scale):
            # Rescaled in place (no second [N, V] copy). Through `.data`, which does not bump
            # the saved tensor's version, so a retained graph can unpack it again.
            factor = grad_output / ctx.scale
            for g in grads:
                if g is not None:
                    g.data.mul_(factor.to(g.dtype))
            ctx.scale = grad_output.clone()
        return (None, None, None, None, *grads)


def _closed_form_chunks(
    reader: _Rows,
    rows: torch.Tensor,
    chunk_size: int,
    lead: torch.Size,
    fn: ChunkFn,
    combined: tuple,
    inputs: Sequence[torch.Tensor],
    grad: torch.Tensor | None,
    need: bool,
    total: torch.Tensor,
) -> float:
    """`_ChunkedLoss.forward` for a divergence against frozen terms: value and gradient in closed
    form (`closed_form.SliceGrad`) on softmax slices of each chunk, written straight into the
    student's gradient rows `grad` (N, V) when the rows are contiguous. Adds Σ loss to `total`
    in place; returns the factor the stored gradient must be multiplied by."""
    weights, divergence, tau, beta = combined
    student, *terms = inputs
    vocab = student.shape[-1]
    dtype = compute_dtype(student, *terms)  # float64 if any input is
    n = rows.numel()
    chunk_size = min(chunk_size, max(n, 1))
    srows = min(chunk_size, max(1, closed_form.DEFAULT_SOFTMAX_ELEMENTS // max(vocab, 1)))
    sg = closed_form.SliceGrad(divergence, tau, beta, srows, vocab, dtype, student.device)
    # Every row in order and (N, V) views of all inputs: chunks are views, nothing is copied.
    flats = [_flat(x, lead) for x in inputs]
    contiguous = n == lead.numel() and all(f is not None for f in flats)
    out_buf = None if contiguous and need else torch.empty(chunk_size, vocab, dtype=dtype,
                                                           device=student.device)  # fmt: skip
    single = len(weights) == 1 and weights[0] == 1.0
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        if contiguous:
            s_chunk = flats[0][start:stop]
            t_chunks = [f[start:stop] for f in flats[1:]]
        else:
            s_chunk = reader.take(student, start, stop)
            t_chunks = [reader.take(t, start, stop) for t in terms]
        # (c, V): the term itself (read only) or the weighted sum, in the compute dtype
        target = t_chunks[0] if single else sum(w * t.to(dtype) for w, t in zip(weights, t_chunks))
        out = grad[start:stop] if contiguous and need else out_buf[: stop - start]
        for a in range(0, stop - start, srows):
            b = min(a + srows, stop - start)
            res = sg(s_chunk[a:b], target[a:b], out[a:b])
            if res is not None:
                total += res[0].sum()
                continue
            # -inf targets or underflow: this slice through autograd, as before.
            with torch.enable_grad():
                leaf = s_chunk[a:b].detach().requires_grad_(need)
                loss = fn(leaf, [t[a:b] for t in t_chunks]).sum()
            if need:
                (g,) = torch.autograd.grad(loss, leaf)
                out[a:b].copy_(g / sg.factor)
            total += loss.detach()
        if need and not contiguous:
            grad.index_copy_(0, rows[start:stop], out.to(grad.dtype))
    return sg.factor


def check_positive_int(name: str, value: object) -> None:
    """`value` must be None or a positive int (bools are refused: True is not a size)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")


def check_reduction(reduction: str) -> None:
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def check_mask_dtype(mask: torch.Tensor) -> None:
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor (True counts), got dtype {mask.dtype}")


def _flatten_mask(mask: torch.Tensor | None, lead: torch.Size, device) -> torch.Tensor:
    """Indices of counted positions in the flattened leading shape."""
    n = lead.numel()
    if mask is None:
        return torch.arange(n, device=device)
    check_mask_dtype(mask)
    if mask.shape != lead:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not match the logits' leading shape "
            f"{tuple(lead)}; pass one bool per position"
        )
    return mask.reshape(-1).nonzero().squeeze(1).to(device)


def _reduce(total: torch.Tensor, count: int, reduction: Reduction) -> torch.Tensor:
    if reduction == "sum":
        return total
    return total / max(count, 1)


def _run(
    student: torch.Tensor,
    terms: Sequence[torch.Tensor],
    fn: ChunkFn,
    mask: torch.Tensor | None,
    chunk_size: int | None,
    reduction: Reduction,
) -> torch.Tensor:
    """Flatten, select counted rows, then evaluate all at once or chunk by chunk."""
    check_reduction(reduction)
    check_positive_int("chunk_size", chunk_size)
    if not student.dtype.is_floating_point:
        raise ValueError(f"student logits must be floating point, got {student.dtype}")
    lead = student.shape[:-1]
    rows = _flatten_mask(mask, lead, student.device)
    count = rows.numel()
    if chunk_size is None:
        if mask is None:  # every row counts: (N, ...) views where the layout allows
            flat = [x.reshape(lead.numel(), *x.shape[len(lead) :]) for x in (student, *terms)]
            per = fn(flat[0], flat[1:])  # (N,)
        else:
            reader = _Rows(rows, lead)
            per = fn(reader.take(student), [reader.take(t) for t in terms])
        return _reduce(per.sum(), count, reduction)
    total = _ChunkedLoss.apply(rows, fn, chunk_size, lead, student, *terms)
    return _reduce(total, count, reduction)


def chunked_sum(
    student_logits: torch.Tensor,
    terms: Sequence[torch.Tensor],
    fn: ChunkFn,
    *,
    mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Σ over counted positions of `fn(student (n, V), [term (n, ...)])` → per-position (n,).

    For losses of another shape than a divergence (e.g. MiniLLM's weighted surrogate): with
    `chunk_size` the positions are walked `chunk_size` at a time and each chunk's gradient is
    computed during the forward pass, exactly like `kd_loss` (terms are `[..., *]` tensors with
    the student's leading shape; only floating-point terms may carry gradient).
    """
    return _run(student_logits, terms, fn, mask, chunk_size, "sum")


def kd_loss(
    student_logits: torch.Tensor,
    target_logits: torch.Tensor | SparseTarget,
    *,
    divergence: str = "fkl",
    temperature: float = 1.0,
    beta: float = 0.5,
    mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Mean (over counted positions) divergence between target and student distributions.

    Args:
        student_logits: `[..., V]` student logits.
        target_logits: `[..., V]` target logits (gradient flows into them if they need it), or
            a `SparseTarget` of leading shape `[...]` (forward KL only; its temperature must
            equal `temperature`).
        divergence: one of `fkl, rkl, jsd, skl, srkl, tvd` (docs/ARCHITECTURE.md §1).
        temperature: τ; both distributions are softmaxes of logits / τ. No τ² factor.
        beta: β of `jsd` (TRL's generalized JSD), and the skew of `skl` / `srkl`.
        mask: bool `[...]`, True counts; None counts every position.
        chunk_size: positions materialised at once (forward and backward); same value.
        reduction: "mean" over counted positions, or "sum".

    Returns: a float32 scalar (float64 for float64 inputs).
    """
    check_divergence_args(divergence, temperature, beta)
    if isinstance(target_logits, SparseTarget):
        target_logits.check_usable(divergence, temperature)
        if target_logits.shape != student_logits.shape[:-1]:
            raise ValueError(
                f"sparse target positions {tuple(target_logits.shape)} do not match the "
                f"student's {tuple(student_logits.shape[:-1])}"
            )
        t = target_logits
        terms = [x.detach() for x in (t.indices, t.logprobs, t.tail_mass, t.tail_coeffs)
                 if x is not None]  # fmt: skip
        fn = _sparse_fn(temperature, t.tail_basis, t.tail_offset)
        return _run(student_logits, terms, fn, mask, chunk_size, reduction)
    _check_same_shape({"student": student_logits, "target": target_logits})
    fn = _combined_fn([1.0], divergence, temperature, beta)
    return _run(student_logits, [target_logits], fn, mask, chunk_size, reduction)


def delta_kd_loss(
    student_logits: torch.Tensor,
    teacher_ft_logits: torch.Tensor,
    teacher_raw_logits: torch.Tensor,
    student_raw_logits: torch.Tensor,
    *,
    alpha: float = 1.0,
    temperature: float = 1.0,
    divergence: str = "fkl",
    beta: float = 0.5,
    mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
    reduction: Reduction = "mean",
    floor: float | None = None,
) -> torch.Tensor:
    """`kd_loss(student, delta_target(teacher_ft, teacher_raw, student_raw, alpha,
    floor=floor, temperature=temperature), ...)`.

    With `chunk_size` set the target z* is built one chunk at a time and never materialised
    in full. The frozen roles get no gradient. `floor` (robust Delta-KD): the raw models'
    log-probabilities at τ are floored at it before differencing (`deltakd.losses.targets`).
    """
    refs = {
        "teacher_ft": teacher_ft_logits,
        "teacher_raw": teacher_raw_logits,
        "student_raw": student_raw_logits,
    }
    return parallelogram_loss(
        student_logits,
        refs,
        variant="delta",
        alpha=alpha,
        temperature=temperature,
        divergence=divergence,
        beta=beta,
        mask=mask,
        chunk_size=chunk_size,
        reduction=reduction,
        floor=floor,
    )


def parallelogram_loss(
    student_logits: torch.Tensor,
    refs: Mapping[str, torch.Tensor],
    *,
    variant: str = "delta",
    alpha: float = 1.0,
    temperature: float = 1.0,
    divergence: str | None = None,
    beta: float = 0.5,
    mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
    reduction: Reduction = "mean",
    floor: float | None = None,
) -> torch.Tensor:
    """Divergence between a catalogue target (`PARALLELOGRAM_VARIANTS`) and the student.

    `refs` maps frozen role names (`teacher_ft`, `teacher_raw`, `student_raw`, `teacher_ft2`)
    to `[..., V]` logits; the live student enters the target as the variant says, with or
    without stop-gradient. `divergence=None` uses the variant's default. `floor` (robust
    Delta-KD; the Delta-KD family only): the raw roles' log-probabilities at τ are floored at
    it, chunk by chunk like the rest of the target.
    """
    v = get_variant(variant)
    divergence = v.default_divergence if divergence is None else divergence
    check_divergence_args(divergence, temperature, beta)
    v.check_floor(floor)
    terms = variant_terms(v, student_logits, refs, alpha)
    _check_same_shape({"student": student_logits, **{r: refs[r] for r in v.roles}})
    fn = _combined_fn([w for _, w in terms], divergence, temperature, beta,
                      v.floored(alpha), floor)  # fmt: skip
    tensors = [t for t, _ in terms]
    return _run(student_logits, tensors, fn, mask, chunk_size, reduction)
