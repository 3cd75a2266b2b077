"""Fused linear + distillation loss: logits are made from hidden states one chunk at a time.

At Qwen2.5 scale one batch of 8k response tokens has 8k × 152k logits per model — 5 GB in
float32, four times over for Delta-KD, plus the softmax intermediates of the loss. Here the
student's forward stops at its last hidden states; `fused_distill_loss` walks the counted
positions `chunk_size` at a time and, for each chunk,

1. computes the student's logits `h_chunk @ W_s.T` — through the model's own output layer when
   the head is a `LogitHead` (bias, scale, final soft cap; docs/LOSSES.md "Output layers") —
   and the target `z* = Σ_i w_i z_i` of the chosen Delta-KD / parallelogram variant (a
   reference given as hidden states and lm_head is multiplied out straight into one shared
   target buffer: no per-model logits are kept),
2. evaluates the divergence (the same `per_position_divergence` / `sparse_fkl_per_position` as
   the unfused `deltakd.losses.kd` losses) plus, optionally, the λ·SFT cross-entropy,
3. takes the gradient `g` w.r.t. that chunk of student logits — in closed form for `fkl`,
   `rkl` and `jsd` against a frozen target (`deltakd.losses.closed_form`), else with autograd
   (for the live student variants the logits appear both as the student and inside the target;
   autograd sums both paths) — chains it through the soft cap and scale if any, and turns it into
   `grad_h[chunk] = g @ W_s` and `grad_W_s += g.T @ h_chunk`.

So at most one chunk of logits per model exists at a time, and the gradients of the student's
hidden states and lm_head are ready when the forward pass returns; the backward pass only scales
them by the incoming gradient. This is the approach of Liger-Kernel's fused linear
cross-entropy and fused linear JSD (`liger_kernel/ops/fused_linear_cross_entropy.py`,
`liger_kernel/ops/fused_linear_jsd.py`, Hsu et al. 2024, arXiv 2410.10989), extended to the three
frozen models of Delta-KD and to every divergence and target in `deltakd.losses`.

The value and gradients equal `parallelogram_loss` / `kd_loss` on explicitly computed logits
(tests compare them in float64).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from deltakd.losses import closed_form
from deltakd.losses.divergences import check_divergence_args, per_position_divergence
from deltakd.losses.heads import LogitHead, linear_float32_
from deltakd.losses.kd import check_mask_dtype, check_positive_int, check_reduction
from deltakd.losses.sparse import SparseTarget, sparse_fkl_per_position
from deltakd.losses.targets import FLOOR_ROLES, floor_logprobs_, get_variant

Reduction = Literal["mean", "sum"]

#: A reference given as `(hidden [..., H_r], head [V_r, H_r])`, with a bias `[V_r]` third, or
#: as `(hidden, LogitHead)` (a head with the model's own scale / soft cap / bias).
LinearRef = (
    tuple[torch.Tensor, torch.Tensor | LogitHead]
    | tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]
)
#: What a role may map to: dense logits `[..., V_r]`, a `SparseTarget`, or a `LinearRef`.
RefInput = torch.Tensor | SparseTarget | LinearRef

#: Rows per chunk when `chunk_size` is not given: the matmuls run at full speed on a CPU from
#: about 256 rows on, and two (256, 152k) float32 buffers take 311 MB.
DEFAULT_CHUNK_SIZE = 256
#: Logits per softmax / divergence slice when `softmax_chunk_size` is not given.
DEFAULT_SOFTMAX_ELEMENTS = closed_form.DEFAULT_SOFTMAX_ELEMENTS


_LOW_PRECISION = (torch.bfloat16, torch.float16)


@dataclass
class _Linear:
    """A model's last hidden states and its lm_head, already sliced to the shared vocab.

    `weight` and `bias` are in the matmul dtype: the inputs' own dtype when hidden states and
    head share a 16-bit dtype (no float32 copy of the [V, H] head), else the compute dtype.
    A 16-bit product is kept in float32 (`linear_float32_`) unless `float32_logits` is False,
    which rounds it to 16 bits as the model's own lm_head does.
    """

    hidden: torch.Tensor  # (N, H) flattened, original dtype
    weight: torch.Tensor  # (V, H) in the matmul dtype
    bias: torch.Tensor | None  # (V,) in the matmul dtype
    # Scale / soft cap applied after `h @ W.T + b` (the model's own head), None for none.
    head: LogitHead | None = None
    float32_logits: bool = True

    @property
    def wide(self) -> bool:
        """16-bit inputs whose product is kept in float32."""
        return self.float32_logits and self.weight.dtype in _LOW_PRECISION

    def logits(self, rows, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(h[rows] in the matmul dtype (c, H), logits h @ W.T + b (c, V)).

        The logits are written into `out` when it has the logits' dtype (the matmul dtype, or
        the compute dtype for a product kept in float32).
        """
        h = _take(self.hidden, rows).to(self.weight.dtype)  # (c, H)
        if self.wide:
            z = out
            if z is None:
                z = torch.empty(h.shape[0], self.weight.shape[0], dtype=torch.float32,
                                device=h.device)  # fmt: skip
            linear_float32_(z, h, self.weight)
            if self.bias is not None:
                z.add_(self.bias.to(z.dtype))
            return h, z
        out_mm = out if out is not None and out.dtype == self.weight.dtype else None
        if self.bias is not None:
            z = torch.addmm(self.bias, h, self.weight.t(), out=out_mm)
        else:
            z = torch.mm(h, self.weight.t(), out=out_mm)
        return h, z

    def logits_into(
        self, out: torch.Tensor, rows, weight: float, first: bool, scratch: torch.Tensor | None
    ) -> None:
        """out (+)= weight · head(h[rows]), in place.   # (c, V)

        A soft-capped head is evaluated in `out` itself when it is the first term, else in
        `scratch` (a (c, V) buffer of out's dtype reused by every chunk)."""
        head = self.head
        if (
            (out.dtype == self.weight.dtype or self.wide)
            and self.bias is None
            and (head is None or head.is_linear)
        ):
            h = _take(self.hidden, rows).to(self.weight.dtype)  # (c, H)
            beta = 0.0 if first else 1.0
            alpha = weight if head is None else weight * head.scale  # a scale folds into alpha
            linear_float32_(out, h, self.weight, alpha=alpha, beta=beta)
            return
        if head is not None and not head.is_linear:
            dest = out if first else scratch
            assert dest is not None
            _, z = self.logits(rows, out=dest)
            if z is not dest:
                dest.copy_(z)  # 16-bit logits, upcast: the soft cap runs in the compute dtype
            head.transform_(dest)
            if first:
                out.mul_(weight)
            else:
                out.add_(dest, alpha=weight)
            return
        _, z = self.logits(rows)  # a 16-bit chunk, or one with a bias
        if head is not None:
            z = head.transform_(z.to(out.dtype))  # the scale, in the compute dtype
        if first:
            torch.mul(z, weight, out=out)
        else:
            out.add_(z, alpha=weight)


@dataclass
class _Floored:
    """A raw role's term of a robust Delta-KD target: `τ · max(log_softmax(z/τ), floor)` of its
    dense logits or `_Linear` output, made one chunk at a time like the other terms."""

    ref: torch.Tensor | _Linear
    floor: float
    temperature: float

    def logits_into(
        self, out: torch.Tensor, rows, weight: float, first: bool, scratch: torch.Tensor | None
    ) -> None:
        """out (+)= weight · floored term, in place; the term is built in `out` when first,
        else in `scratch`."""
        dest = out if first else scratch
        assert dest is not None
        if isinstance(self.ref, _Linear):
            self.ref.logits_into(dest, rows, 1.0, True, None)
        else:
            dest.copy_(_take(self.ref, rows))
        floor_logprobs_(dest, self.floor, self.temperature)
        if first:
            out.mul_(weight)
        else:
            out.add_(dest, alpha=weight)


@dataclass
class _Plan:
    """Everything the chunk loop needs; built and validated by `fused_distill_loss`."""

    rows: torch.Tensor | None  # counted positions (n,), or None for all N in order
    count: int  # counted positions
    n_total: int  # N
    vocab: int  # V
    dtype: torch.dtype  # compute dtype
    chunk_size: int
    softmax_rows: int  # rows per softmax / divergence evaluation inside a chunk
    student: _Linear
    # (weight, dense (N, V), linear, or either under a robust Delta-KD floor)
    frozen: list[tuple[float, torch.Tensor | _Linear | _Floored]]
    live_weight: float  # weight of the live student (with gradient) inside the target
    sg_weight: float  # weight of the stop-gradient student inside the target
    sparse: SparseTarget | None  # leading shape (N,)
    divergence: str
    temperature: float
    beta: float
    kd_scale: float  # multiplies Σ divergence: (1 − λ) / count for "mean"
    labels: torch.Tensor | None  # (N,) long, or None when λ = 0
    ignore_index: int
    sft_scale: float  # multiplies Σ cross-entropy: λ / count_sft for "mean"
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


def _take(x: torch.Tensor, rows) -> torch.Tensor:
    """Rows of a flattened (N, ...) tensor: a view for a slice, a copy for an index tensor."""
    return x[rows] if isinstance(rows, slice) else x.index_select(0, rows)


def _chunks(plan: _Plan):
    """(rows of the chunk, chunk length): slices when every position counts (no copies)."""
    n = plan.count
    for start in range(0, n, plan.chunk_size):
        stop = min(start + plan.chunk_size, n)
        if plan.rows is None:
            yield slice(start, stop), stop - start
        else:
            yield plan.rows[start:stop], stop - start


def _run_chunks(plan: _Plan, need_h: bool, need_w: bool, need_b: bool) -> torch.Tensor:
    """The chunk loop: returns the loss and fills plan.parts with grads and components."""
    s = plan.student
    dtype, device, vocab = plan.dtype, s.weight.device, plan.vocab
    any_grad = need_h or need_w or need_b
    # Every row of grad_h is written when every position counts; masked rows need zeros.
    new_h = torch.empty if plan.rows is None else torch.zeros
    grad_h = new_h(plan.n_total, s.hidden.shape[1], dtype=dtype, device=device) if need_h else None
    # The head's gradient sums over chunks, in the compute dtype; the first chunk's matmul
    # writes it (beta = 0), so it is not zero-filled first (a pass over [V, H]).
    grad_w = torch.empty(s.weight.shape, dtype=dtype, device=device) if need_w else None
    w_written = False
    grad_b = torch.zeros(vocab, dtype=dtype, device=device) if need_b else None
    kd_total = torch.zeros((), dtype=dtype, device=device)
    sft_total = torch.zeros((), dtype=dtype, device=device)
    # Two (C, V) buffers reused by every chunk: the student's logits, and the target's, whose
    # rows are overwritten by dL/dz_student once their softmax slice has been consumed.
    cap = min(plan.chunk_size, max(plan.count, 1))
    zs_buf = torch.empty(cap, vocab, dtype=dtype, device=device)
    work_buf = torch.empty(cap, vocab, dtype=dtype, device=device)
    # A third buffer only when a soft-capped or floored reference is not the target's first
    # term.
    capped = [
        i
        for i, (_, ref) in enumerate(plan.frozen)
        if isinstance(ref, _Floored)
        or (isinstance(ref, _Linear) and ref.head is not None and not ref.head.is_linear)
    ]
    scratch_buf = (
        torch.empty(cap, vocab, dtype=dtype, device=device)
        if any(i > 0 for i in capped) and plan.sparse is None
        else None
    )
    # The closed-form value + gradient (deltakd.losses.closed_form) where it applies; `work`
    # then holds each chunk's gradient divided by g_scale, which the matmuls multiply back.
    fast = None
    g_scale = 1.0
    sft_ratio = 0.0
    if (
        plan.sparse is None
        and not plan.live_weight
        and closed_form.supports(plan.divergence, plan.temperature, plan.labels is not None)
        and plan.kd_scale > 0
    ):
        fast = closed_form.SliceGrad(
            plan.divergence, plan.temperature, plan.beta, plan.softmax_rows, vocab, dtype, device
        )
        g_scale = plan.kd_scale * fast.factor
        sft_ratio = plan.sft_scale / plan.kd_scale
    for rows, c in _chunks(plan):
        zs = zs_buf[:c]
        h, z = s.logits(rows, out=zs)  # (c, H), (c, V)
        if z is not zs:
            zs.copy_(z)  # 16-bit logits, upcast
            del z
        if s.head is not None:
            s.head.transform_(zs)  # the model's scale / soft cap: zs are its logits now
        work = work_buf[:c]  # the target (c, V), then the gradient
        if plan.sparse is None:
            first = True
            for w, ref in plan.frozen:
                if isinstance(ref, (_Linear, _Floored)):
                    scratch = None if scratch_buf is None else scratch_buf[:c]
                    ref.logits_into(work, rows, w, first, scratch)
                elif first:
                    torch.mul(_take(ref, rows).to(dtype), w, out=work)
                else:
                    work.add_(_take(ref, rows).to(dtype), alpha=w)
                first = False
            if first:
                work.zero_()
            if plan.sg_weight:
                work.add_(zs, alpha=plan.sg_weight)
            sparse = None
        else:
            sparse = plan.sparse.map_positions(lambda t: _take(t, rows))  # noqa: B023
        labels = None if plan.labels is None else _take(plan.labels, rows)
        # The softmax and divergence run on row slices of the chunk: their intermediates (a few
        # (rows, V) arrays) stay small while the matmuls keep full chunks. Each slice's
        # gradient (dL/dz_student, divided by g_scale) overwrites its consumed target rows.
        for a in range(0, c, plan.softmax_rows):
            b = min(a + plan.softmax_rows, c)
            lab = None if labels is None else labels[a:b]
            res = None
            if fast is not None:
                res = fast(zs[a:b], work[a:b], work[a:b], lab, plan.ignore_index, sft_ratio)
            if res is not None:
                per, ce_sum = res
                kd_total += per.sum()
                if ce_sum is not None:
                    sft_total += ce_sum
                continue
            # The autograd path: other divergences, live-student targets, sparse targets, and
            # slices whose closed form is not finite (-inf targets, underflow).
            g = _slice_autograd(plan, zs[a:b], None if sparse is None else (sparse, a, b),
                                work[a:b], lab, any_grad, kd_total, sft_total)  # fmt: skip
            if g is not None:
                work[a:b].copy_(g)
                if fast is not None:  # the other slices hold the gradient / g_scale
                    work[a:b].div_(g_scale)
                del g
        if not any_grad:
            continue
        if s.head is not None:
            # Chain rule through scale and soft cap: dL/d(h @ W.T + b). zs is consumed.
            s.head.backward_(work, zs)
        g = work if s.weight.dtype == dtype else work.to(s.weight.dtype)  # (c, V)
        if need_h:
            gh = g @ s.weight  # (c, H), in the matmul dtype
            if g_scale != 1.0:
                gh.mul_(g_scale)  # (c, H): a pass over H columns, not V
            if isinstance(rows, slice):
                grad_h[rows] = gh
            else:
                # index_copy_ does not cast: a 16-bit chunk into the compute-dtype buffer.
                grad_h.index_copy_(0, rows, gh.to(grad_h.dtype))
        if need_w:
            # (V, H) += (V, c) @ (c, H), in the compute dtype
            grad_w.addmm_(work.t(), h.to(dtype), beta=1.0 if w_written else 0.0, alpha=g_scale)
            w_written = True
        if need_b:
            grad_b.add_(work.sum(0), alpha=g_scale)
        del g
    plan.parts["kd_sum"] = kd_total
    plan.parts["sft_sum"] = sft_total
    if grad_w is not None and not w_written:
        grad_w.zero_()  # nothing counted
    plan.parts["grads"] = (grad_h, grad_w, grad_b)
    return plan.kd_scale * kd_total + plan.sft_scale * sft_total


def _slice_autograd(
    plan: _Plan,
    zs: torch.Tensor,
    sparse: tuple[SparseTarget, int, int] | None,
    target: torch.Tensor,
    labels: torch.Tensor | None,
    any_grad: bool,
    kd_total: torch.Tensor,
    sft_total: torch.Tensor,
) -> torch.Tensor | None:
    """One softmax slice through autograd: adds its sums to the totals in place, returns
    dL/dz_student (r, V) when a gradient is wanted. `zs` (r, V) are the student's logits,
    `target` (r, V) the frozen part of the target (unused for a sparse target, given as the
    chunk's `SparseTarget` and the slice's rows a:b)."""
    with torch.set_grad_enabled(any_grad):
        leaf = zs.detach().requires_grad_(any_grad)
        if sparse is not None:
            chunk, a, b = sparse
            t = chunk.map_positions(lambda x: x[a:b])
            per = sparse_fkl_per_position(
                leaf, t.indices, t.logprobs, t.tail_mass, plan.temperature,
                t.tail_coeffs, t.tail_basis, t.tail_offset,
            )  # fmt: skip
        else:
            if plan.live_weight:
                # The student's logits sit inside the target too; autograd sums both.
                target = target + plan.live_weight * leaf
            per = per_position_divergence(
                leaf, target, plan.divergence, plan.temperature, plan.beta
            )
        kd_sum = per.sum()
        loss = plan.kd_scale * kd_sum
        if labels is not None:
            ce_sum = F.cross_entropy(leaf, labels, ignore_index=plan.ignore_index, reduction="sum")
            loss = loss + plan.sft_scale * ce_sum
            sft_total += ce_sum.detach()
        kd_total += kd_sum.detach()
        if not any_grad:
            return None
        (g,) = torch.autograd.grad(loss, leaf)  # (r, V): dL/dz_student
        return g


def _student_grads(plan: _Plan, hidden, head, bias, needs) -> tuple[torch.Tensor, list]:
    """Run the chunk loop; return the loss and the gradients in the inputs' shapes and dtypes."""
    loss = _run_chunks(plan, *needs)
    grad_h, grad_w, grad_b = plan.parts.pop("grads")
    if grad_h is not None:
        grad_h = grad_h.to(hidden.dtype).reshape(hidden.shape)
    # Padded vocabulary rows of the head get zeros.
    if grad_w is not None and (grad_w.shape != head.shape or grad_w.dtype != head.dtype):
        full = torch.zeros_like(head)
        full[: grad_w.shape[0]] = grad_w
        grad_w = full
    if grad_b is not None:
        full_b = torch.zeros_like(bias)
        full_b[: grad_b.shape[0]] = grad_b
        grad_b = full_b
    return loss, [grad_h, grad_w, grad_b]


class _FusedLinearDistill(torch.autograd.Function):
    """Loss of `fused_distill_loss`. The gradients of the student's hidden states, head and bias
    are computed in forward; backward scales them in place and hands the buffers over.

    Handing over (dropping ctx's reference) lets autograd keep the buffer as `.grad` instead of
    cloning it: no second [V, H] head gradient. A repeated backward through the same graph
    (retain_graph, gradcheck) recomputes them.
    """

    @staticmethod
    def forward(ctx, plan, hidden, head, bias):  # type: ignore[override]
        need_h, need_w, need_b = ctx.needs_input_grad[1:4]
        ctx.needs = (need_h, need_w, bias is not None and need_b)
        loss, ctx.grads = _student_grads(plan, hidden, head, bias, ctx.needs)
        ctx.plan, ctx.inputs = plan, (hidden, head, bias)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):  # type: ignore[override]
        grads = ctx.grads
        if grads is None:  # handed over by an earlier backward through this graph
            _, grads = _student_grads(ctx.plan, *ctx.inputs, ctx.needs)
        ctx.grads = None
        if not torch.equal(grad_output, torch.ones_like(grad_output)):
            for g in grads:
                if g is not None:
                    g.mul_(grad_output.to(g.dtype))
        return (None, *grads)


def _floored(
    ref: torch.Tensor | _Linear, role: str, floor: float | None, temperature: float
) -> torch.Tensor | _Linear | _Floored:
    """`ref` as a term of the target: under the floor when `role` is a raw model's."""
    if floor is None or role not in FLOOR_ROLES:
        return ref
    return _Floored(ref, float(floor), float(temperature))


def _check_lead(name: str, shape: torch.Size, lead: torch.Size, what: str) -> None:
    if shape != lead:
        raise ValueError(
            f"{name} has leading shape {tuple(shape)} but the student's hidden states have "
            f"{tuple(lead)}; {what} must be aligned position by position with the student"
        )


def _linear(
    name: str,
    hidden: torch.Tensor,
    head: torch.Tensor,
    bias: torch.Tensor | None,
    n_total: int,
    vocab: int,
    dtype: torch.dtype,
    transform: LogitHead | None = None,
    float32_logits: bool = True,
) -> _Linear:
    """Flatten hidden states, slice an lm_head (and bias) to the shared vocabulary;
    `transform` carries the head's scale / soft cap (None or an identity: plain linear)."""
    hidden_size = hidden.shape[-1]
    if head.dim() != 2 or head.shape[1] != hidden_size:
        raise ValueError(
            f"{name} lm_head weight must be [V, {hidden_size}] to match its hidden states, got "
            f"{tuple(head.shape)}"
        )
    if head.shape[0] < vocab:
        raise ValueError(
            f"{name} lm_head has {head.shape[0]} rows but the shared vocabulary has {vocab} "
            "tokens; all roles must share one tokenizer (pass vocab_size=len(tokenizer))"
        )
    # 16-bit hidden and head: multiply in that dtype (as the model itself would, and without a
    # float32 copy of the [V, H] head); otherwise convert to the compute dtype.
    mm_dtype = head.dtype if head.dtype == hidden.dtype and head.dtype in _LOW_PRECISION else dtype
    w = head.detach()[:vocab].to(mm_dtype)
    b = None
    if bias is not None:
        if bias.shape != (head.shape[0],):
            raise ValueError(
                f"{name} lm_head bias must be [{head.shape[0]}], got {tuple(bias.shape)}"
            )
        b = bias.detach()[:vocab].to(mm_dtype)
    if transform is not None and transform.scale == 1.0 and transform.softcap is None:
        transform = None
    return _Linear(hidden.reshape(n_total, hidden_size), w, b, transform, float32_logits)


def _split_head(
    name: str, head: torch.Tensor | LogitHead, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None, LogitHead | None]:
    """(weight, bias, transform) of a plain weight (+ bias) or of a `LogitHead`."""
    if not isinstance(head, LogitHead):
        return head, bias, None
    if bias is not None and head.bias is not None:
        raise ValueError(
            f"{name} bias is given twice (as a separate bias and in its LogitHead); pass one"
        )
    return head.weight, head.bias if bias is None else bias, head


def fused_distill_loss(
    student_hidden: torch.Tensor,
    student_head: torch.Tensor | LogitHead,
    refs: Mapping[str, RefInput],
    *,
    student_bias: torch.Tensor | None = None,
    variant: str | None = "delta",
    target_role: str = "teacher_ft",
    alpha: float = 1.0,
    temperature: float = 1.0,
    divergence: str | None = None,
    beta: float = 0.5,
    mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
    softmax_chunk_size: int | None = None,
    reduction: Reduction = "mean",
    sft_weight: float = 0.0,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    vocab_size: int | None = None,
    return_components: bool = False,
    delta_floor: float | None = None,
    float32_logits: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Delta-KD / parallelogram / plain KD loss computed straight from hidden states.

    `L = λ · L_SFT + (1 − λ) · D(π_target, π_student)` reduced over counted positions, where
    the student's logits are `student_hidden @ student_head[:V].T (+ bias)` — or, for a
    `LogitHead`, that model's own `softcap((h @ W.T + b) · scale)` — never materialised for more
    than `chunk_size` positions at a time (see the module docstring; after Liger-Kernel's fused
    linear cross-entropy / JSD).

    Args:
        student_hidden: `[..., H]` the student's last hidden states (`model.model(...)`
            `.last_hidden_state`), already aligned (the state at t scores token t+1).
        student_head: `[V_s, H]` the student's lm_head weight, `V_s ≥ V` (padded rows allowed),
            or a `deltakd.losses.heads.LogitHead` holding it with the family's bias, scale and
            soft cap (`deltakd.heads.logit_head(model)`); the gradient flows through them into
            the head's weight and bias.
        refs: role → one of
            - dense logits `[..., V_r]` (`V_r ≥ V`; sliced to `V`),
            - a `SparseTarget` of leading shape `[...]` (plain KD, forward KL only),
            - `(hidden [..., H_r], head [V_r, H_r])`, `(hidden, head, bias [V_r])` or
              `(hidden, LogitHead)`: the reference's logits are computed one chunk at a time,
              like the student's.
            Frozen roles: `teacher_ft`, `teacher_raw`, `student_raw`, `teacher_ft2` (whatever
            the variant names). They receive no gradient.
        student_bias: `[V_s]` lm_head bias, if the student has one (gets a gradient).
        variant: a `PARALLELOGRAM_VARIANTS` name (`delta` is Delta-KD's
            `z* = z_teacher_ft + α·(z_student_raw − z_teacher_raw)`), or None for plain KD
            against `refs[target_role]`. Live-student variants put the student's logits inside
            the target (with or without gradient), as in `parallelogram_loss`.
        target_role: the role plain KD (`variant=None`) distils from.
        alpha: α of the variant's weights.
        temperature: τ of both softmaxes (no τ² factor). The SFT term is at τ = 1.
        divergence: `fkl, rkl, jsd, skl, srkl, tvd`; None uses the variant's default (`fkl`
            for plain KD).
        beta: β of `jsd` and the skew of `skl` / `srkl`.
        mask: bool `[...]`, True counts; None counts every position. Nothing counted gives 0.0
            with zero gradients.
        chunk_size: positions per chunk (default `DEFAULT_CHUNK_SIZE`): rows of every logits
            matmul. Any value gives the same loss.
        softmax_chunk_size: rows per softmax / divergence evaluation inside a chunk (default:
            `DEFAULT_SOFTMAX_ELEMENTS // V`, at least 1); bounds the divergence's intermediates
            without shrinking the matmuls.
        reduction: "mean" over counted positions or "sum".
        sft_weight: λ; with λ > 0, `labels` is required and the cross-entropy of the student's
            logits against `labels` is computed in the same pass, over counted positions whose
            label is not `ignore_index` ("mean": averaged over those).
        labels: `[...]` integer next-token ids for the SFT term.
        ignore_index: label value that the SFT term skips.
        vocab_size: the shared vocabulary V (rows of every head and columns of every dense ref
            beyond it are padding and are ignored); default `student_head.shape[0]`.
        return_components: also return `{"kd": D reduced, "sft": CE reduced}` (detached, before
            the λ weights; "sft" only when λ > 0) for logging.
        delta_floor: robust Delta-KD (the Delta-KD family of variants only): the raw roles'
            log-probabilities at τ are floored at it before differencing
            (`deltakd.losses.targets.floor_logprobs`); None is plain Delta-KD.
        float32_logits: for 16-bit hidden states and heads, keep each product `h @ W.T` in
            float32 (default). False rounds it to 16 bits, as the model's own lm_head does:
            with bf16 references that costs the Delta-KD target 1.4e-3 nats/token of
            KL(π*_fp32 ‖ π*), against 5e-5 in float32 (docs/BENCHMARKS.md, "Precision").

    Returns:
        The scalar loss in float32 (float64 if any input is float64; bf16/fp16 inputs are
        computed in float32). Backward gives `student_hidden` a `[..., H]` gradient,
        `student_head` a `[V_s, H]` one (zero on padded rows) and `student_bias` a `[V_s]` one.

    Memory: two `(chunk_size, V)` buffers (the student's logits; the target, overwritten by the
    logits' gradient), the divergence's intermediates for `softmax_chunk_size` rows, one
    `[V, H]` head gradient (compute dtype) and one `[N, H]` hidden gradient. 16-bit hidden
    states and heads stay 16-bit (the head is upcast a block of rows at a time for the float32
    product, never whole); mixed dtypes are converted to the compute dtype (a `[V, H]` copy).
    Backward scales the stored gradients in place and hands them to autograd without a copy;
    a repeated backward (retain_graph) recomputes them; double backward is not supported.
    """
    check_reduction(reduction)
    check_positive_int("chunk_size", chunk_size)
    check_positive_int("softmax_chunk_size", softmax_chunk_size)
    if chunk_size is None:
        chunk_size = DEFAULT_CHUNK_SIZE
    if not 0.0 <= sft_weight <= 1.0:
        raise ValueError(f"sft_weight (λ) must be in [0, 1], got {sft_weight!r}")
    if not student_hidden.dtype.is_floating_point or student_hidden.dim() < 1:
        raise ValueError(
            f"student_hidden must be a floating-point [..., H] tensor, got {student_hidden.dtype} "
            f"{tuple(student_hidden.shape)}"
        )
    lead = student_hidden.shape[:-1]
    n_total = lead.numel()
    student_head, student_bias, s_transform = _split_head(
        "the student's", student_head, student_bias
    )
    vocab = student_head.shape[0] if vocab_size is None else int(vocab_size)
    if vocab < 1:
        raise ValueError(f"vocab_size must be ≥ 1, got {vocab_size!r}")

    # Which roles and weights make the target.
    if variant is None:
        if target_role not in refs:
            raise ValueError(
                f"plain KD (variant=None) distils from refs[{target_role!r}], but refs has only "
                f"{sorted(refs)}; pass that role or set target_role"
            )
        divergence = "fkl" if divergence is None else divergence
        weights: list[tuple[str, float]] = [(target_role, 1.0)]
    else:
        v = get_variant(variant)
        divergence = v.default_divergence if divergence is None else divergence
        weights = v.weights(alpha)
        v.check_floor(delta_floor)
    if variant is None and delta_floor is not None:
        raise ValueError("delta_floor needs a Delta-KD variant, not plain KD (variant=None)")
    check_divergence_args(divergence, temperature, beta)

    tensors = [student_hidden, student_head]
    for ref in refs.values():
        if isinstance(ref, torch.Tensor):
            tensors.append(ref)
        elif isinstance(ref, (tuple, list)):
            for t in ref:
                tensors.extend([t.weight] if isinstance(t, LogitHead) else [t])
    tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32

    student = _linear(
        "the student's",
        student_hidden,
        student_head,
        student_bias,
        n_total,
        vocab,
        dtype,
        s_transform,
        float32_logits,
    )

    frozen: list[tuple[float, torch.Tensor | _Linear]] = []
    live_weight = sg_weight = 0.0
    sparse = None
    for role, w in weights:
        if role == "student":
            live_weight += w
            continue
        if role == "student_sg":
            sg_weight += w
            continue
        if role not in refs:
            raise ValueError(
                f"parallelogram variant {variant!r} needs the {role!r} reference but refs has "
                f"only {sorted(refs)}; configure a reference model for {role!r}"
            )
        ref = refs[role]
        if isinstance(ref, SparseTarget):
            if variant is not None:
                raise ValueError(
                    f"refs[{role!r}] is a SparseTarget, which is a whole target distribution, "
                    f"not one role's logits; pass variant=None, target_role={role!r} to distil "
                    "from it, or give that role as dense logits or (hidden, head)"
                )
            ref.check_usable(divergence, temperature)
            _check_lead(f"refs[{role!r}]", ref.shape, lead, "sparse targets")
            k = ref.k
            indices = ref.indices.reshape(n_total, k)
            if indices.numel() and int(indices.max()) >= vocab:
                raise ValueError(
                    f"refs[{role!r}] holds token ids up to {int(indices.max())}, outside the "
                    f"shared vocabulary of {vocab}; rebuild the target with this tokenizer"
                )
            sparse = ref.map_positions(lambda t: t.detach().reshape(n_total, *t.shape[len(lead) :]))
        elif isinstance(ref, torch.Tensor):
            _check_lead(f"refs[{role!r}] logits", ref.shape[:-1], lead, "reference logits")
            if ref.shape[-1] < vocab:
                raise ValueError(
                    f"refs[{role!r}] logits have {ref.shape[-1]} columns but the shared "
                    f"vocabulary has {vocab} tokens; all roles must share one tokenizer"
                )
            dense = ref.detach().reshape(n_total, ref.shape[-1])[:, :vocab]
            frozen.append((w, _floored(dense, role, delta_floor, temperature)))
        elif isinstance(ref, (tuple, list)) and len(ref) in (2, 3):
            r_hidden = ref[0]
            r_head, r_bias, r_transform = _split_head(
                f"refs[{role!r}]", ref[1], ref[2] if len(ref) == 3 else None
            )
            _check_lead(f"refs[{role!r}] hidden states", r_hidden.shape[:-1], lead, "hidden states")
            linear = _linear(
                f"refs[{role!r}]",
                r_hidden.detach(),
                r_head,
                r_bias,
                n_total,
                vocab,
                dtype,
                r_transform,
                float32_logits,
            )
            frozen.append((w, _floored(linear, role, delta_floor, temperature)))
        else:
            raise ValueError(
                f"refs[{role!r}] must be logits [..., V], a SparseTarget, or a (hidden, head) "
                f"pair, got {type(ref).__name__}"
            )

    # Counted positions.
    rows = None
    count = n_total
    if mask is not None:
        check_mask_dtype(mask)
        _check_lead("mask", mask.shape, lead, "the mask")
        flat_mask = mask.reshape(-1)
        if not bool(flat_mask.all()):
            rows = flat_mask.nonzero().squeeze(1).to(student_hidden.device)
            count = rows.numel()

    flat_labels = None
    sft_scale = 0.0
    if sft_weight > 0:
        if labels is None:
            raise ValueError(
                f"sft_weight={sft_weight} needs labels [...] (next-token ids) for the SFT term; "
                "pass labels or set sft_weight=0"
            )
        _check_lead("labels", labels.shape, lead, "labels")
        flat_labels = labels.reshape(-1).long().to(student_hidden.device)
        valid = flat_labels != ignore_index
        if rows is not None:
            valid = valid.index_select(0, rows)
        sft_count = int(valid.sum())
        if bool((flat_labels[flat_labels != ignore_index] >= vocab).any()):
            raise ValueError(f"labels hold token ids ≥ the vocabulary size {vocab}")
        sft_scale = sft_weight if reduction == "sum" else sft_weight / max(sft_count, 1)
    kd_weight = 1.0 - sft_weight
    kd_scale = kd_weight if reduction == "sum" else kd_weight / max(count, 1)

    plan = _Plan(
        rows=rows,
        count=count,
        n_total=n_total,
        vocab=vocab,
        dtype=dtype,
        chunk_size=chunk_size,
        softmax_rows=min(
            chunk_size,
            max(1, DEFAULT_SOFTMAX_ELEMENTS // vocab)
            if softmax_chunk_size is None
            else softmax_chunk_size,
        ),
        student=student,
        frozen=frozen,
        live_weight=live_weight,
        sg_weight=sg_weight,
        sparse=sparse,
        divergence=divergence,
        temperature=float(temperature),
        beta=float(beta),
        kd_scale=kd_scale,
        labels=flat_labels,
        ignore_index=ignore_index,
        sft_scale=sft_scale,
    )
    inputs = (student_hidden, student_head, student_bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        loss = _FusedLinearDistill.apply(plan, student_hidden, student_head, student_bias)
    else:
        loss = _run_chunks(plan, False, False, False)
        plan.parts.pop("grads")
    if not return_components:
        return loss
    per = 1.0 if reduction == "sum" else 1.0 / max(count, 1)
    parts = {"kd": plan.parts["kd_sum"] * per}
    if sft_weight > 0:
        parts["sft"] = plan.parts["sft_sum"] * (sft_scale / sft_weight)
    return loss, parts


__all__: Sequence[str] = ("DEFAULT_CHUNK_SIZE", "DEFAULT_SOFTMAX_ELEMENTS", "fused_distill_loss")
