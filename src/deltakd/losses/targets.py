"""Distillation targets built as linear combinations of role logits (docs/ARCHITECTURE.md §1).

Delta-KD keeps the shift that SFT caused in the teacher and applies it to the student's own
starting point:

    π* ∝ π_teacher_ft · (π_student_raw / π_teacher_raw)^α
    z* = z_teacher_ft + α · (z_student_raw − z_teacher_raw),     π* = softmax(z* / τ)

(normalisers cancel inside the softmax). Every target here is `z_target = Σ_i w_i(α) · z_i`
over named roles, which is what lets the chunked and fused losses build it one chunk at a time.

Robust Delta-KD (`floor`, the config's `delta_floor`): the raw models' log-probabilities at τ
are floored at f before they are differenced,

    z*/τ = z_teacher_ft/τ + α · (max(log π_student_raw, f) − max(log π_teacher_raw, f)),
    log π_x = log_softmax(z_x / τ),

i.e. each raw role's term `z_x` becomes `τ · max(log_softmax(z_x/τ), f)` (`floor_logprobs`).
Without the floor this differs from `z_x` by a per-position constant only, which the softmax
ignores. Where both raw models give a token less than e^f the ratio π_student_raw /
π_teacher_raw is 1 instead of an arbitrarily large number, so the tail of π* stays bounded.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from deltakd.losses.divergences import DIVERGENCES, compute_dtype

#: Roles a target may name. `student` is the live student WITH gradient through the target;
#: `student_sg` is the live student under stop-gradient; the others are frozen models.
TARGET_ROLES: tuple[str, ...] = (
    "teacher_ft",
    "teacher_ft2",
    "teacher_raw",
    "student_raw",
    "student",
    "student_sg",
)
LIVE_ROLES: frozenset[str] = frozenset({"student", "student_sg"})
#: The raw models whose log-probabilities a `floor` (robust Delta-KD) bounds from below.
FLOOR_ROLES: frozenset[str] = frozenset({"student_raw", "teacher_raw"})


def check_floor(floor: float | None) -> None:
    """`floor` must be None (off) or a negative log-probability (−inf allowed: no effect)."""
    if floor is None:
        return
    if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not floor < 0:
        raise ValueError(
            f"floor (delta_floor) must be None or a negative log-probability such as -8.0, "
            f"got {floor!r}"
        )


def floor_logprobs(logits: torch.Tensor, floor: float, temperature: float = 1.0) -> torch.Tensor:
    """`τ · max(log_softmax(logits / τ), floor)`: a raw role's term in a floored target.

    `[..., V]` → `[..., V]` in the compute dtype (float32, or float64 for float64 input).
    """
    x = logits.to(compute_dtype(logits))
    return floor_logprobs_(x.clone() if x is logits else x, floor, temperature)


def floor_logprobs_(z: torch.Tensor, floor: float, temperature: float = 1.0) -> torch.Tensor:
    """In-place `floor_logprobs` on a float buffer `[..., V]` (the fused loss's chunks)."""
    if temperature != 1.0:
        z.div_(temperature)
    z.sub_(torch.logsumexp(z, dim=-1, keepdim=True)).clamp_(min=floor)
    if temperature != 1.0:
        z.mul_(temperature)
    return z


def delta_target(
    teacher_ft: torch.Tensor,
    teacher_raw: torch.Tensor,
    student_raw: torch.Tensor,
    alpha: float = 1.0,
    *,
    floor: float | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Delta-KD target logits `z* = teacher_ft + α · (student_raw − teacher_raw)`.

    Args: three `[..., V]` logit tensors of one shape (any float dtype); `floor` (robust
    Delta-KD, see the module docstring): the raw models' log-probabilities at `temperature`
    are floored at it before differencing; None (default) is plain Delta-KD.
    Returns: `[..., V]` in float32 (float64 if an input is), without gradient.
    α = 0 gives the finetuned teacher; α = 1 the full parallelogram
    `student_raw + (teacher_ft − teacher_raw)`.
    """
    _check_same_shape(
        {"teacher_ft": teacher_ft, "teacher_raw": teacher_raw, "student_raw": student_raw}
    )
    check_floor(floor)
    dtype = compute_dtype(teacher_ft, teacher_raw, student_raw)
    with torch.no_grad():
        z = teacher_ft.to(dtype)
        if alpha != 0:
            s, t = student_raw.to(dtype), teacher_raw.to(dtype)
            if floor is not None:
                s, t = floor_logprobs(s, floor, temperature), floor_logprobs(t, floor, temperature)
            z = z + alpha * (s - t)
    return z


@dataclass(frozen=True)
class ParallelogramVariant:
    """A named target `z = Σ (c + a·α) · z_role` and the divergence it is meant for."""

    name: str
    #: (role, constant weight c, α-coefficient a): the role's weight is c + a·α.
    terms: tuple[tuple[str, float, float], ...]
    formula: str
    description: str
    default_divergence: str = "fkl"

    @property
    def roles(self) -> tuple[str, ...]:
        """Frozen roles this variant needs from a reference source."""
        return tuple(r for r, _, _ in self.terms if r not in LIVE_ROLES)

    @property
    def floorable(self) -> bool:
        """True for the Delta-KD family, whose shift is `α · (z_student_raw − z_teacher_raw)`:
        the targets a `floor` (robust Delta-KD) applies to."""
        coeffs = {r: (c, a) for r, c, a in self.terms}
        return coeffs.get("student_raw") == (0, 1) and coeffs.get("teacher_raw") == (0, -1)

    def floored(self, alpha: float) -> list[bool]:
        """Per entry of `weights(alpha)`: whether a floor applies to that role's term."""
        return [r in FLOOR_ROLES for r, _ in self.weights(alpha)]

    def check_floor(self, floor: float | None) -> None:
        """Refuse a floor for a variant outside the Delta-KD family (ValueError)."""
        check_floor(floor)
        if floor is not None and not self.floorable:
            floorable = [n for n, v in PARALLELOGRAM_VARIANTS.items() if v.floorable]
            raise ValueError(
                f"a floor (delta_floor) applies to targets whose shift is "
                f"α·(z_student_raw − z_teacher_raw) ({', '.join(floorable)}), not to "
                f"{self.name!r}; unset it"
            )

    @property
    def has_live_gradient(self) -> bool:
        """True when gradient flows through the target (the live student with no stop-grad)."""
        return any(r == "student" for r, _, _ in self.terms)

    def weights(self, alpha: float) -> list[tuple[str, float]]:
        """[(role, weight)] at this α, dropping zero weights."""
        out = [(r, c + a * alpha) for r, c, a in self.terms]
        return [(r, w) for r, w in out if w != 0.0]


def _v(name: str, terms, formula: str, description: str, divergence: str = "fkl"):
    return ParallelogramVariant(name, tuple(terms), formula, description, divergence)


#: The catalogue of targets deltakd ships (docs/LOSSES.md explains each).
PARALLELOGRAM_VARIANTS: dict[str, ParallelogramVariant] = {
    v.name: v
    for v in (
        _v(
            "delta",
            [("teacher_ft", 1, 0), ("student_raw", 0, 1), ("teacher_raw", 0, -1)],
            "z* = z_teacher_ft + α·(z_student_raw − z_teacher_raw)",
            "Delta-KD (arXiv 2509.14526): the teacher's SFT shift applied to the student's base.",
        ),
        _v(
            "delta_rkl",
            [("teacher_ft", 1, 0), ("student_raw", 0, 1), ("teacher_raw", 0, -1)],
            "z* = z_teacher_ft + α·(z_student_raw − z_teacher_raw), D = KL(π_student ‖ π*)",
            "Delta-KD target trained with reverse KL (mode-seeking).",
            "rkl",
        ),
        _v(
            "multi_teacher",
            [
                ("teacher_ft", 0.5, 0),
                ("teacher_ft2", 0.5, 0),
                ("student_raw", 0, 1),
                ("teacher_raw", 0, -1),
            ],
            "z* = ½·(z_teacher_ft + z_teacher_ft2) + α·(z_student_raw − z_teacher_raw)",
            "Two teachers finetuned from one base: the mean of their logits carries the "
            "average SFT shift, applied to the student's base.",
        ),
        _v(
            "student_anchor",
            [("student_raw", 1, 0), ("teacher_ft", 0, 1), ("teacher_raw", 0, -1)],
            "z* = z_student_raw + α·(z_teacher_ft − z_teacher_raw)",
            "The teacher's SFT shift, scaled by α, added to the frozen student base (delta at "
            "α = 1; the student's own base at α = 0).",
        ),
        _v(
            "live_shift",
            [("teacher_ft", 1, 0), ("student", 0, 1), ("teacher_raw", 0, -1)],
            "z* = z_teacher_ft + α·(z_student − z_teacher_raw), gradient through z_student",
            "The live student replaces student_raw INSIDE the shift, with gradient. The paper "
            "reports such variants diverge: the target moves with the student.",
        ),
        _v(
            "live_shift_sg",
            [("teacher_ft", 1, 0), ("student_sg", 0, 1), ("teacher_raw", 0, -1)],
            "z* = z_teacher_ft + α·(sg(z_student) − z_teacher_raw)",
            "As live_shift with stop-gradient on the student inside the target.",
        ),
        _v(
            "live_anchor",
            [("student", 1, 0), ("teacher_ft", 0, 1), ("teacher_raw", 0, -1)],
            "z* = z_student + α·(z_teacher_ft − z_teacher_raw), gradient through z_student",
            "The live student is the parallelogram's anchor, with gradient through the target.",
        ),
        _v(
            "live_anchor_sg",
            [("student_sg", 1, 0), ("teacher_ft", 0, 1), ("teacher_raw", 0, -1)],
            "z* = sg(z_student) + α·(z_teacher_ft − z_teacher_raw)",
            "The live student (stop-gradient) as anchor: each step pushes the student by the "
            "teacher's SFT shift from wherever it is now.",
        ),
    )
}


def get_variant(name: str) -> ParallelogramVariant:
    """The catalogue entry `name`, or a `ValueError` listing the names that exist."""
    try:
        return PARALLELOGRAM_VARIANTS[name]
    except KeyError:
        raise ValueError(
            f"unknown parallelogram variant {name!r}; choose one of "
            f"{', '.join(PARALLELOGRAM_VARIANTS)}"
        ) from None


def variant_terms(
    variant: ParallelogramVariant,
    student_logits: torch.Tensor,
    refs: Mapping[str, torch.Tensor],
    alpha: float,
) -> list[tuple[torch.Tensor, float]]:
    """[(logits, weight)] of a variant's target, in the order of `variant.weights(alpha)`;
    frozen roles are detached."""
    terms = []
    for role, weight in variant.weights(alpha):
        if role == "student":
            tensor = student_logits
        elif role == "student_sg":
            tensor = student_logits.detach()
        elif role in refs:
            tensor = refs[role].detach()
        else:
            raise ValueError(
                f"parallelogram variant {variant.name!r} needs the {role!r} logits but got "
                f"only {sorted(refs)}; configure a reference model for {role!r}"
            )
        terms.append((tensor, weight))
    return terms


def parallelogram_target(
    variant: str | ParallelogramVariant,
    student_logits: torch.Tensor,
    refs: Mapping[str, torch.Tensor],
    alpha: float = 1.0,
    *,
    floor: float | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """The variant's target logits `Σ w_i z_i` ([..., V], compute dtype).

    Gradient flows to `student_logits` only for variants naming the live `student` role.
    `floor` (Delta-KD family only): the raw roles' terms are `floor_logprobs(z, floor, τ)`.
    """
    v = get_variant(variant) if isinstance(variant, str) else variant
    v.check_floor(floor)
    terms = variant_terms(v, student_logits, refs, alpha)
    _check_same_shape({f"term{i}": t for i, (t, _) in enumerate(terms)})
    dtype = compute_dtype(*(t for t, _ in terms))
    floored = v.floored(alpha) if floor is not None else [False] * len(terms)
    return sum(
        w * (floor_logprobs(t.to(dtype), floor, temperature) if f else t.to(dtype))  # type: ignore[arg-type]
        for (t, w), f in zip(terms, floored)
    )


def _check_same_shape(tensors: Mapping[str, torch.Tensor]) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        detail = ", ".join(f"{n} {s}" for n, s in shapes.items())
        raise ValueError(
            f"logits of different shapes: {detail}. All roles must share one tokenizer and be "
            "aligned position by position; slice padded embedding rows to the tokenizer's "
            "vocabulary (logits[..., :len(tokenizer)]) before computing the loss."
        )


assert all(v.default_divergence in DIVERGENCES for v in PARALLELOGRAM_VARIANTS.values())
