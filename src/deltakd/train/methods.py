"""Training methods: one small class per method, registered by name.

A method owns its target (`target(config)`, a `deltakd.targets.Target`: KD, Delta-KD and the
parallelogram variants are one family of weighted role logits), from which follow the frozen
roles it needs, its divergence term, its fused form (`fused_loss: true`) and what an offline
cache stores for it. The trainer (`deltakd.train.trainer.DistillTrainer`) owns everything
else: data, the reference source, normalisation over the accumulated batch, logging,
checkpoints. docs/ARCHITECTURE.md says where each kind of change goes.

A new parallelogram target is one entry in `deltakd.losses.PARALLELOGRAM_VARIANTS`; a new
method whose loss is not a divergence to such a target (e.g. in a new module
`deltakd/train/mine.py`)::

    from deltakd.train.methods import Method, register_method

    @register_method
    class MyMethod(Method):
        name = "mine"

        def reference_roles(self, config):          # frozen roles it needs
            return ("teacher_ft",)

        def kd_sum(self, batch, refs, config):      # Σ over counted positions
            return kd_loss(batch.student_logits, refs.logits("teacher_ft"),
                           mask=batch.mask, reduction="sum", ...)

and add the module to `METHOD_MODULES` below so it is imported when the registry is read.
Hooks for methods that change the data or the batch: `prepare_rows` (once, before
tokenisation: SeqKD replaces responses with teacher generations), `prepare_batch` (per
micro-batch, before the student's forward pass: on-policy sampling), and `compute` (the whole
loss, for methods that are not "λ·SFT + (1−λ)·divergence", e.g. MiniLLM's policy gradient).
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from deltakd.config.fields import Section
from deltakd.errors import ConfigError
from deltakd.targets import Target, target_of

logger = logging.getLogger("deltakd.train")

if TYPE_CHECKING:
    from deltakd.config import TrainConfig
    from deltakd.losses.heads import LogitHead
    from deltakd.references.role_logits import RoleLogits
    from deltakd.train.trainer import DistillTrainer

# Modules registering further methods; imported on first use of the registry.
METHOD_MODULES: tuple[str, ...] = (
    "deltakd.train.seqkd",
    "deltakd.train.minillm",
    "deltakd.train.on_policy",
)

_REGISTRY: dict[str, type[Method]] = {}
_BUILTIN: tuple[str, ...] = ("sft", "kd", "delta_kd", "parallelogram")
_loaded = False


@dataclass
class StudentBatch:
    """What a method sees of one micro-batch, already aligned for next-token prediction.

    `student_logits[:, t]` scores token `input_ids[:, t + 1]`; positions are trimmed to T−1
    and the vocabulary to the shared tokenizer's V.
    """

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    student_logits: torch.Tensor  # (B, T-1, V); None when `fused_loss` computes from hidden states
    labels: torch.Tensor  # (B, T-1) next tokens
    mask: torch.Tensor  # (B, T-1) bool: True where the next token is a response token
    inputs: dict[str, Any]  # the raw micro-batch (row_index, ...)
    student_hidden: torch.Tensor | None = None  # (B, T-1, H) with `fused_loss`


@dataclass
class LossTerms:
    """Sums over counted positions of one micro-batch (normalised later by the trainer).

    `total` is what is back-propagated; `sft` / `kd` are logged. Extra scalar metrics go in
    `metrics` (summed over micro-batches and processes, divided by the counted tokens).
    """

    total: torch.Tensor
    sft: torch.Tensor | None = None
    kd: torch.Tensor | None = None
    metrics: dict[str, torch.Tensor] | None = None


class Method:
    """Base class: loss = λ·SFT + (1−λ)·KD with `kd_sum` defined by the subclass."""

    name: ClassVar[str] = ""
    #: whether the method uses a divergence at all (sft does not)
    uses_kd: ClassVar[bool] = True
    #: whether the trainer may draw the next step's micro-batches early to prefetch their
    #: references (False for methods whose `prepare_batch` depends on the current weights)
    prefetch_ahead: ClassVar[bool] = True
    #: whether `on_policy_ratio > 0` is implemented for this method
    supports_on_policy: ClassVar[bool] = False
    #: the typed section of its `method_args` (a `deltakd.config.Section` dataclass with
    #: `key = "method_args"`), or None when it reads none
    args: ClassVar[type[Section] | None] = None

    def arguments(self, config: TrainConfig) -> Section:
        """`config.method_args` as this method's typed section (refusals name the key)."""
        assert self.args is not None, f"method {self.name!r} reads no method_args"
        return method_arguments(self.name, self.args, config.method_args)

    def prefetches_ahead(self, config: TrainConfig) -> bool:
        """May the trainer draw the next step's micro-batches early (to prefetch references)?"""
        return self.prefetch_ahead

    def target(self, config: TrainConfig) -> Target | None:
        """The distillation target this method pulls the student towards (`deltakd.targets`),
        or None for methods whose loss has no fixed-form target (sft, seqkd, minillm)."""
        return target_of(config)

    def reference_roles(self, config: TrainConfig) -> tuple[str, ...]:
        """Frozen roles this method needs (from `REFERENCE_ROLES`): its target's by default."""
        target = self.target(config)
        return target.roles if target is not None else ("teacher_ft",)

    def validate(self, config: TrainConfig) -> None:
        """Raise ConfigError for settings this method cannot use (call super() when overriding)."""
        target = self.target(config) if self.uses_kd else None
        if config.fused_loss and self.uses_kd and target is None:
            # No fixed target (MiniLLM's policy gradient needs every position's logits of the
            # student's own samples): there is nothing to fuse, so the shipped configs'
            # `fused_loss: true` is set aside rather than refused when a user switches method.
            logger.warning("fused_loss does not apply to method %r (it has no fixed target to "
                           "fuse); training with full logits.", self.name)  # fmt: skip
            config.fused_loss = False
        if (
            config.fused_loss
            and self.uses_kd
            and target is not None
            and target.fused_args() is None
        ):
            raise ConfigError(
                f"config field 'fused_loss' = True is not allowed: method {self.name!r} has no "
                "fused form; set fused_loss=false."
            )
        if getattr(config, "delta_floor", None) is not None and target is None:
            raise ConfigError(
                f"config field 'delta_floor' = {config.delta_floor!r} is not allowed: method "
                f"{self.name!r} has no Delta-KD target to floor; set delta_floor=null."
            )
        if config.on_policy_ratio > 0 and not self.supports_on_policy:
            raise ConfigError(
                f"config field 'on_policy_ratio' = {config.on_policy_ratio!r} is not allowed: "
                f"method {self.name!r} has no on-policy mode in this build; set on_policy_ratio=0."
            )

    def prepare_rows(self, rows: list[dict], trainer_ctx: Any) -> list[dict]:
        """Rewrite the training rows once before tokenisation (default: unchanged)."""
        return rows

    def prepare_batch(
        self, trainer: DistillTrainer, model: torch.nn.Module, inputs: dict[str, Any]
    ) -> dict[str, Any]:
        """Rewrite a micro-batch before the forward pass (default: unchanged)."""
        return inputs

    def count_tokens(self, inputs: dict[str, Any]) -> int:
        """Positions this micro-batch counts (the loss normaliser sums them over a step)."""
        mask = inputs["assistant_mask"][:, 1:].bool() & inputs["attention_mask"][:, 1:].bool()
        return int(mask.sum())

    def kd_sum(self, batch: StudentBatch, refs: RoleLogits, config: TrainConfig) -> torch.Tensor:
        """Σ over counted positions of the divergence term to the method's target. Scalar."""
        target = self.target(config)
        if target is None:
            raise NotImplementedError(f"method {self.name!r} defines neither a target nor kd_sum")
        return target.kd_sum(batch.student_logits, refs, temperature=config.temperature,
                             beta=config.beta, mask=batch.mask, chunk_size=config.chunk_size)  # fmt: skip

    def fused_terms(
        self, batch: StudentBatch, refs: RoleLogits, config: TrainConfig, head: LogitHead
    ) -> LossTerms:
        """λ·SFT + (1−λ)·KD sums from the student's hidden states and output layer `head`
        (`deltakd.heads.logit_head(model)`; `fused_loss: true`), computed by the method's
        target."""
        target = self.target(config)
        assert target is not None and batch.student_hidden is not None
        loss, parts = target.fused_sum(
            batch.student_hidden, head, refs, labels=batch.labels.masked_fill(~batch.mask, -100),
            mask=batch.mask, lam=config.lam, temperature=config.temperature, beta=config.beta,
            chunk_size=config.chunk_size, vocab_size=refs.vocab_size,
        )  # fmt: skip
        return LossTerms(total=loss, sft=parts.get("sft"), kd=parts.get("kd"))

    def compute(
        self, batch: StudentBatch, refs: RoleLogits | None, config: TrainConfig
    ) -> LossTerms:
        """λ·SFT_sum + (1−λ)·KD_sum; override for losses of another shape."""
        lam = 1.0 if not self.uses_kd else config.lam
        # At λ = 0 the SFT term is only logged: no graph, and no [N, V] float copy kept.
        sft = sft_sum(batch) if lam > 0.0 else sft_sum_for_logging(batch)
        if not self.uses_kd or lam >= 1.0:
            return LossTerms(total=sft, sft=sft)
        assert refs is not None
        kd = self.kd_sum(batch, refs, config)
        total = kd if lam == 0.0 else lam * sft + (1.0 - lam) * kd
        return LossTerms(total=total, sft=sft, kd=kd)


def method_arguments(method: str, cls: type[Section], raw: Mapping[str, Any]) -> Section:
    """`raw` as the typed section `cls`; unknown keys are refused naming the allowed ones."""
    allowed = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    for key in raw:
        if key not in allowed:
            raise ConfigError(
                f"config field 'method_args.{key}' is not used by method {method!r}: "
                f"allowed keys are {', '.join(allowed) or '(none)'}; remove it."
            )
    return cls(**dict(raw))


def sft_sum(batch: StudentBatch) -> torch.Tensor:
    """Σ over counted positions of −log p(next token). Scalar, float32."""
    logits = batch.student_logits[batch.mask]  # (N, V)
    targets = batch.labels[batch.mask]  # (N,)
    return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")


def counted_chunks(
    mask: torch.Tensor, size: int | None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(batch rows, positions) of the True entries of `mask` (B, T), `size` pairs at a time
    (all at once for None): for indexing a [B, T, V] tensor without reshaping it."""
    b_idx, t_idx = mask.nonzero(as_tuple=True)  # (n,), (n,)
    step = size or max(b_idx.numel(), 1)
    for a in range(0, b_idx.numel(), step):
        yield b_idx[a : a + step], t_idx[a : a + step]


@torch.no_grad()
def sft_sum_for_logging(batch: StudentBatch, rows_per_chunk: int = 1024) -> torch.Tensor:
    """`sft_sum` without gradient, `rows_per_chunk` positions at a time (bounded memory)."""
    logits = batch.student_logits  # (B, T-1, V), often a non-contiguous slice: never reshaped
    total = torch.zeros((), dtype=torch.float32, device=logits.device)
    for b, t in counted_chunks(batch.mask, rows_per_chunk):
        total += torch.nn.functional.cross_entropy(
            logits[b, t].float(), batch.labels[b, t], reduction="sum"
        )
    return total


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make `cls` available as `method: <cls.name>`."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} must set a non-empty `name`")
    _REGISTRY[cls.name] = cls
    return cls


def _load_plugins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in METHOD_MODULES:
        importlib.import_module(module)


def method_names() -> tuple[str, ...]:
    """Registered method names: the built-ins, then plug-ins alphabetically (an order that does
    not depend on which module happened to be imported first)."""
    _load_plugins()
    builtin = [n for n in _BUILTIN if n in _REGISTRY]
    return (*builtin, *sorted(n for n in _REGISTRY if n not in _BUILTIN))


def get_method(name: str) -> Method:
    _load_plugins()
    try:
        return _REGISTRY[name]()
    except KeyError:
        raise ConfigError(
            f"config field 'method' = {name!r} is not allowed: expected one of "
            f"{', '.join(method_names())}."
        ) from None


# --- the built-in methods ------------------------------------------------------------------


@register_method
class SFT(Method):
    """Cross-entropy on the dataset's responses; no references."""

    name = "sft"
    uses_kd = False

    def reference_roles(self, config: TrainConfig) -> tuple[str, ...]:
        return ()


@register_method
class KD(Method):
    """D(π_teacher_ft, π_student) for any divergence (`deltakd.targets.kd_target`)."""

    name = "kd"


@register_method
class DeltaKD(Method):
    """D(softmax(z*/τ), π_student), z* = z_ft + α(z_student_raw − z_teacher_raw)
    (`deltakd.targets.delta_kd_target`; at α = 0 the target is teacher_ft alone)."""

    name = "delta_kd"


@register_method
class Parallelogram(Method):
    """A named target from `deltakd.losses.PARALLELOGRAM_VARIANTS`
    (`deltakd.targets.parallelogram_variant_target`)."""

    name = "parallelogram"

    def validate(self, config: TrainConfig) -> None:
        target_of(config)  # refuses an unknown `variant`, naming the catalogue
        super().validate(config)
