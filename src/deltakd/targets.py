"""The distillation target of a run: which distribution the student is pulled towards.

KD, Delta-KD and every parallelogram variant are one family: a target `z = Σ_i w_i(α) · z_i`
over role logits (`deltakd.losses.ParallelogramVariant`) and a divergence `D(π_target,
π_student)`. `target_of(config)` answers, for any config, the one `Target` that the trainer's
loss, the fused loss and the offline cache builder all use, so none of them switches on the
method's name or re-derives a rule such as "α = 0 is plain KD on teacher_ft".

Adding a target family is one entry in `deltakd.losses.PARALLELOGRAM_VARIANTS` (then it is a
`method: parallelogram` variant with every path above) or one builder in `TARGET_BUILDERS`
for a new method name. This module sits below `deltakd.references` and `deltakd.train`
(docs/ARCHITECTURE.md): it imports `deltakd.losses` and `deltakd.errors` only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from deltakd.errors import ConfigError
from deltakd.losses import (
    PARALLELOGRAM_VARIANTS,
    ParallelogramVariant,
    delta_target,
    get_variant,
    kd_loss,
    parallelogram_loss,
    parallelogram_target,
)
from deltakd.losses.heads import LogitHead
from deltakd.losses.targets import LIVE_ROLES

#: Plain KD as a (one-term) member of the family; not a catalogue entry.
KD_VARIANT = ParallelogramVariant(
    "kd", (("teacher_ft", 1.0, 0.0),), "z = z_teacher_ft", "Standard KD on the finetuned teacher."
)


@dataclass(frozen=True)
class Target:
    """A method's target at its settings. See the module docstring.

    Attributes:
        method: the config's method (recorded in a cache's manifest).
        variant: the weights `(role, c, a)`, weight `c + a·α`.
        alpha: α of the weights.
        divergence: the divergence the loss uses (the config's, else the variant's own).
        manifest_variant / manifest_alpha / formula: how a cache's manifest names it.
        floor: robust Delta-KD's floor on the raw models' log-probabilities at τ (the config's
            `delta_floor`; `deltakd.losses.targets`), or None.
    """

    method: str
    variant: ParallelogramVariant
    alpha: float
    divergence: str
    formula: str
    manifest_variant: str | None = None
    manifest_alpha: float | None = None
    floor: float | None = None

    @property
    def weights(self) -> list[tuple[str, float]]:
        """[(role, weight)] at α, zero weights dropped."""
        return self.variant.weights(self.alpha)

    @property
    def single_role(self) -> str | None:
        """The frozen role when the target is exactly one model's logits (plain KD: `kd`, and
        Delta-KD or any variant whose other weights vanish at this α), else None."""
        w = self.weights
        if len(w) == 1 and w[0][1] == 1.0 and w[0][0] not in LIVE_ROLES:
            return w[0][0]
        return None

    @property
    def catalogued(self) -> bool:
        """Whether the losses know the variant by name (its chunked / fused forms)."""
        return PARALLELOGRAM_VARIANTS.get(self.variant.name) is self.variant

    @property
    def roles(self) -> tuple[str, ...]:
        """Frozen roles the reference source must provide."""
        one = self.single_role
        return (one,) if one is not None else self.variant.roles

    @property
    def live_roles(self) -> tuple[str, ...]:
        """Roles of the live student inside the target (then it changes every step)."""
        return tuple(r for r, _ in self.weights if r in LIVE_ROLES)

    # --- what a cache stores ---------------------------------------------------------------
    def check_cacheable(self, config: Any) -> None:
        """Refuse targets an offline cache cannot hold (ConfigError naming the cause)."""
        live = self.live_roles
        if live:
            raise ConfigError(f"parallelogram variant {self.variant.name!r} puts the live student "
                              f"({live[0]}) inside the target, which changes every step, so it "
                              "cannot be cached; use references: local or servers.")  # fmt: skip
        if self.divergence != "fkl":
            raise ConfigError(f"divergence {self.divergence!r} (config field 'divergence' = "
                              f"{config.divergence!r}, method {self.method!r}) cannot use an "
                              "offline cache: sparse top-k targets support the forward KL (fkl) "
                              "only. Use an fkl method/variant or references: local / servers.")  # fmt: skip

    def logits(self, get: Callable[[str], torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
        """The target logits from `get(role)` (frozen roles only), float32 or wider.
        `temperature` matters only under a floor (it is applied to log-probabilities at τ)."""
        one = self.single_role
        if one is not None:
            z = get(one)
            return z if z.dtype == torch.float64 else z.float()
        if self.variant is PARALLELOGRAM_VARIANTS["delta"]:  # its closed form, as delta_kd_loss
            return delta_target(get("teacher_ft"), get("teacher_raw"), get("student_raw"),
                                alpha=self.alpha, floor=self.floor, temperature=temperature)  # fmt: skip
        refs = {r: get(r) for r in self.variant.roles}
        return parallelogram_target(self.variant, None, refs, alpha=self.alpha,  # type: ignore[arg-type]
                                    floor=self.floor, temperature=temperature)  # fmt: skip

    def describe(self, k: int, temperature: float) -> dict[str, Any]:
        """The manifest's `target` entry: which distribution the stored top-k belong to."""
        entry = {"method": self.method, "variant": self.manifest_variant,
                 "alpha": self.manifest_alpha, "temperature": float(temperature), "k": int(k),
                 "formula": self.formula}  # fmt: skip
        if self.floor is not None:  # only when set: caches built without one keep their hash
            entry["delta_floor"] = float(self.floor)
        return entry

    # --- losses ----------------------------------------------------------------------------
    def kd_sum(
        self,
        student_logits: torch.Tensor,
        refs: Any,
        *,
        temperature: float,
        beta: float,
        mask: torch.Tensor,
        chunk_size: int | None,
    ) -> torch.Tensor:
        """Σ over counted positions of D(π_target, π_student). `refs` answers `logits(role)`
        and holds `target` (a cached `SparseTarget`, or None)."""
        common: dict[str, Any] = dict(divergence=self.divergence, temperature=temperature,
                                      beta=beta, mask=mask, chunk_size=chunk_size,
                                      reduction="sum")  # fmt: skip
        if refs.target is not None:  # a cache already holds the whole target
            return kd_loss(student_logits, refs.target, **common)
        one = self.single_role
        if one is not None:
            return kd_loss(student_logits, refs.logits(one), **common)
        if self.catalogued:
            return parallelogram_loss(student_logits, {r: refs.logits(r) for r in self.roles},
                                      variant=self.variant.name, alpha=self.alpha,
                                      floor=self.floor, **common)  # fmt: skip
        z = parallelogram_target(self.variant, student_logits,
                                 {r: refs.logits(r) for r in self.roles}, alpha=self.alpha,
                                 floor=self.floor, temperature=temperature)  # fmt: skip
        return kd_loss(student_logits, z, **common)

    def fused_args(self) -> dict[str, Any] | None:
        """`variant` / `target_role` / `divergence` of `fused_distill_loss`, or None when the
        fused loss cannot compute this target."""
        one = self.single_role
        if one is not None:
            return {"variant": None, "target_role": one, "divergence": self.divergence}
        if self.catalogued:
            return {"variant": self.variant.name, "divergence": self.divergence,
                    "delta_floor": self.floor}  # fmt: skip
        return None

    def fused_sum(
        self,
        student_hidden: torch.Tensor,
        head: LogitHead | torch.nn.Module,
        refs: Any,
        *,
        labels: torch.Tensor,
        mask: torch.Tensor,
        lam: float,
        temperature: float,
        beta: float,
        chunk_size: int | None,
        vocab_size: int,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """λ·SFT + (1−λ)·KD sums straight from the student's last hidden states `(B, T-1, H)`
        and output layer `head` (a `LogitHead` with the family's bias, scale and soft cap, from
        `deltakd.heads.logit_head`; a plain `nn.Linear` is `h @ W.T + b`), never holding more
        than a chunk of logits per model.

        `refs` is a `deltakd.references.role_logits.RoleLogits` (its `ref` holds each role's
        logits or hidden states, `heads` the roles' output layers). Returns the loss and
        `{"sft", "kd"}` (detached) for logging.
        """
        from deltakd.losses import fused_distill_loss

        args = self.fused_args()
        if args is None:
            raise ConfigError(f"target {self.variant.name!r} has no fused form; set "
                              "fused_loss=false.")  # fmt: skip
        device = student_hidden.device
        ref_inputs: dict[str, Any] = {}
        if refs.target is not None:
            # A cached target is the whole z: plain KD against it.
            args.update(variant=None, target_role="teacher_ft", delta_floor=None)
            ref_inputs["teacher_ft"] = refs.target
        else:
            for role in self.roles:
                if role in refs.ref.logits:
                    ref_inputs[role] = refs.ref.logits[role][:, :-1].to(device)
                elif role in refs.ref.hidden:
                    ref_inputs[role] = (refs.ref.hidden[role][:, :-1].to(device),
                                        refs.heads[role].to(device))  # fmt: skip
                else:
                    refs.logits(role)  # raises the "no output for role" error
        s_head, s_bias = (head, None) if isinstance(head, LogitHead) else (head.weight, head.bias)
        loss, parts = fused_distill_loss(
            student_hidden,
            s_head,
            ref_inputs,
            student_bias=s_bias,
            alpha=self.alpha,
            temperature=temperature,
            beta=beta,
            mask=mask,
            chunk_size=chunk_size,
            reduction="sum",
            sft_weight=lam,
            labels=labels if lam > 0 else None,
            vocab_size=vocab_size,
            return_components=True,
            **args,
        )
        return loss, parts


# --- the builders ------------------------------------------------------------------------------


def _divergence(config: Any, variant: ParallelogramVariant) -> str:
    # An explicit `divergence` wins; unset (None) means the variant's own (delta_rkl: rkl).
    return config.divergence if config.divergence is not None else variant.default_divergence


def _floor(config: Any, variant: ParallelogramVariant) -> float | None:
    """The config's `delta_floor`, refused for a target outside the Delta-KD family."""
    floor = getattr(config, "delta_floor", None)
    if floor is None:
        return None
    try:
        variant.check_floor(floor)
    except ValueError:
        family = [n for n, v in PARALLELOGRAM_VARIANTS.items() if v.floorable]
        raise ConfigError(f"config field 'delta_floor' = {floor!r} is not allowed for method "
                          f"{config.method!r}" + (f" variant {variant.name!r}"
                          if config.method == "parallelogram" else "") + ": the floor bounds the "
                          "raw models' log-probabilities inside α·(z_student_raw − "
                          "z_teacher_raw), which only delta_kd and the parallelogram variants "
                          f"{', '.join(family)} have. Set delta_floor=null.") from None  # fmt: skip
    return float(floor)


def kd_target(config: Any) -> Target:
    _floor(config, KD_VARIANT)
    return Target("kd", KD_VARIANT, 0.0, _divergence(config, KD_VARIANT), KD_VARIANT.formula)


def delta_kd_target(config: Any) -> Target:
    v = PARALLELOGRAM_VARIANTS["delta"]
    alpha = float(config.alpha)
    floor = _floor(config, v)
    formula = "z* = z_teacher_ft + α·(z_student_raw − z_teacher_raw)"
    if floor is not None:
        formula = (f"z*/τ = z_teacher_ft/τ + α·(max(log π_student_raw, {floor:g}) − "
                   f"max(log π_teacher_raw, {floor:g}))")  # fmt: skip
    return Target("delta_kd", v, alpha, _divergence(config, v), formula,
                  manifest_alpha=alpha, floor=floor)  # fmt: skip


def parallelogram_variant_target(config: Any) -> Target:
    if config.variant not in PARALLELOGRAM_VARIANTS:
        raise ConfigError(f"config field 'variant' = {config.variant!r} is not allowed: method "
                          f"'parallelogram' needs one of {', '.join(PARALLELOGRAM_VARIANTS)}.")  # fmt: skip
    v = get_variant(config.variant)
    alpha = float(config.alpha)
    return Target("parallelogram", v, alpha, _divergence(config, v), v.formula,
                  manifest_variant=v.name, manifest_alpha=alpha, floor=_floor(config, v))  # fmt: skip


#: method name -> its target at a config's settings. Methods without a fixed-form target
#: (sft, seqkd, minillm) have none.
TARGET_BUILDERS: dict[str, Callable[[Any], Target]] = {
    "kd": kd_target,
    "delta_kd": delta_kd_target,
    "parallelogram": parallelogram_variant_target,
}


def target_of(config: Any) -> Target | None:
    """The target of `config.method` at the config's settings, or None (no such target)."""
    build = TARGET_BUILDERS.get(config.method)
    return build(config) if build is not None else None
