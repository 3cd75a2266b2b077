"""MiniLLM (Gu et al., "MiniLLM: Knowledge Distillation of Large Language Models", ICLR 2024,
arXiv 2306.08543): minimise the sequence-level reverse KL `KL(q_θ ‖ p)` of the student q_θ to
the finetuned teacher p by policy gradient on the student's own samples.

Notation, for a prompt x and a sampled response y = y_1..y_T (the generated tokens, stop token
included): q_t(·) = q_θ(· | y_<t, x) and p_t(·) = p(· | y_<t, x), both softmaxes at the config's
`temperature` τ over the shared vocabulary. The per-token reward is

    r_t = log p_t(y_t) − log q_t(y_t)

and `KL(q_θ ‖ p) = −E_{y∼q_θ}[Σ_t r_t]`. Its gradient (the paper's Eq. 2–5) splits into

    ∇L = (∇L)_Single + (∇L)_Long
    (∇L)_Single =  E[ Σ_t w_t ∇ KL(q_t ‖ p_t) ]                (single-step decomposition)
    (∇L)_Long   = −E[ Σ_t w_t R̄_{t+1} ∇ log q_t(y_t) ]

(a) single-step decomposition: the next-token reverse KL `KL(q_t ‖ p_t) = Σ_v q_t(v) (log q_t(v)
    − log p_t(v))` is computed exactly over the vocabulary and differentiated directly; the
    policy gradient only carries the long-term part, whose return R starts at t+1.
(b) teacher-mixed sampling: responses are drawn from p̃_t = α_mix·p_t + (1 − α_mix)·q_t
    (`method_args.teacher_mix`, the paper's α = 0.2) and re-weighted by the single-step
    importance weight w_t = q_t(y_t) / p̃_t(y_t) (the paper's approximation of the product of
    the ratios), clipped to at most `method_args.importance_clip` (default 1.0; the ratio is at
    most 1/(1 − α_mix) anyway).
(c) length normalisation: R̄_{t+1} = (1 / (T − t)) Σ_{t'=t+1..T} r_{t'}, the mean of the future
    rewards instead of their sum, so long responses are not favoured (`method_args.length_norm`;
    false uses the plain sum). R̄_{T+1} = 0.

The surrogate minimised per micro-batch (w and R̄ are constants, i.e. detached) is

    Σ_{counted t} [ w_t · KL(q_t ‖ p_t)  −  w_t · R̄_{t+1} · log q_t(y_t) ]

divided by the response tokens of the accumulated batch, like every method. The logged
`kd_loss` is the mean exact next-token reverse KL `KL(q_t ‖ p_t)` on the student's samples.

Simplifications with respect to the paper (named, not hidden):
- no PPO ratio clipping and no value baseline: every sample is used for exactly one gradient
  step right after it was drawn (fully on-policy), so the PPO ratio would be 1;
- no pretraining-corpus loss L_PT (λ must be 0 here; SFT on the dataset is the `sft` method);
- the importance weight is the single-step ratio, as in the paper's own approximation, with the
  clip above; sampling uses no top-k / top-p;
- with `references: servers` or `cache`, teacher-mixed sampling still needs the teacher's
  next-token distribution at every decoding step, so the method loads its own copy of
  teacher_ft in the training process (with `references: local` it reuses that model).

Prompts are the rows' prompts (the tokens before the last assistant turn, left-truncated to
`max_prompt_length`); responses are at most `max_new_tokens` long (see `deltakd.train.on_policy`
for the sampling loop, the batch layout and the resume-exact seeding).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from deltakd.config.fields import Section, bad, help_meta
from deltakd.errors import ConfigError
from deltakd.losses.kd import chunked_sum
from deltakd.train.methods import (
    LossTerms,
    Method,
    StudentBatch,
    counted_chunks,
    method_arguments,
    register_method,
)
from deltakd.train.on_policy import StudentSampler

if TYPE_CHECKING:
    from deltakd.train.config import TrainConfig
    from deltakd.train.trainer import DistillTrainer, RoleLogits


@dataclass(eq=True)
class MiniLLMArgs(Section):
    """`method_args` of `minillm`."""

    key: ClassVar[str] = "method_args"

    teacher_mix: float = field(
        default=0.2,
        metadata=help_meta("the teacher's share α of the sampling mixture, in [0, 1) (paper: 0.2)"),
    )
    importance_clip: float | None = field(
        default=1.0,
        metadata=help_meta("upper clip of the importance weight q/p̃ (> 0), or null for no clip"),
    )
    length_norm: bool = field(
        default=True,
        metadata=help_meta("average the rewards over the response instead of summing them"),
    )

    def validate(self) -> None:
        if not 0.0 <= self.teacher_mix < 1.0:
            raise bad("method_args.teacher_mix", self.teacher_mix, "a number in [0, 1) (the "
                      "teacher's share α of the sampling mixture; paper: 0.2)")  # fmt: skip
        if self.importance_clip is not None and not self.importance_clip > 0:
            raise bad("method_args.importance_clip", self.importance_clip, "a number > 0 (upper "
                      "clip of the importance weight q/p̃), or null for no clip")  # fmt: skip


def minillm_settings(config: TrainConfig) -> MiniLLMArgs:
    """`method_args` as minillm's typed settings (defaults filled, values checked)."""
    return method_arguments("minillm", MiniLLMArgs, config.method_args)  # type: ignore[return-value]


def minillm_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    teacher_mix: float = 0.2,
    importance_clip: float | None = 1.0,
    length_norm: bool = True,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MiniLLM's surrogate loss and the exact reverse KL, both summed over counted positions.

    Args:
        student_logits: (B, T, V) aligned so position t scores `labels[:, t]`.
        teacher_logits: (B, T, V) same alignment; no gradient flows into it.
        labels: (B, T) the sampled tokens y_t.
        mask: (B, T) bool, True on the sampled tokens (each row's response is one contiguous
            run; positions after it must be False).
        chunk_size: positions whose (n, V) softmaxes exist at once (None: all of them). The
            weights need every position's log q(y_t), log p(y_t) first, so the logits are
            read twice: once without gradient for the rewards, once for the surrogate.
    Returns:
        (surrogate, reverse_kl): scalars; `surrogate` carries the gradient (module docstring),
        `reverse_kl` = Σ_t KL(q_t ‖ p_t) (detached).
    """
    mask_f = mask.float()  # (B, T)
    y = labels.clamp(min=0)  # (B, T)
    teacher_logits = teacher_logits.detach()
    with torch.no_grad():
        # Pass 1: log q_t(y_t), log p_t(y_t) and the exact KL at the counted positions.
        logq_y = torch.zeros(mask.shape, dtype=torch.float32, device=student_logits.device)
        logp_y = torch.zeros_like(logq_y)
        rkl = torch.zeros((), dtype=torch.float32, device=student_logits.device)
        for b, t in counted_chunks(mask, chunk_size):
            logq = torch.log_softmax(student_logits[b, t].float() / temperature, dim=-1)  # (c, V)
            logp = torch.log_softmax(teacher_logits[b, t].float() / temperature, dim=-1)
            logq_y[b, t] = logq.gather(-1, y[b, t, None]).squeeze(-1)
            logp_y[b, t] = logp.gather(-1, y[b, t, None]).squeeze(-1)
            rkl += (logq.exp() * (logq - logp)).sum()
        reward = (logp_y - logq_y) * mask_f  # (B, T)
        # Returns from t+1 on: reverse cumulative sums minus the current term.
        future = reward.flip(-1).cumsum(-1).flip(-1) - reward  # (B, T)
        if length_norm:
            remaining = mask_f.flip(-1).cumsum(-1).flip(-1) - mask_f  # tokens after t
            future = torch.where(remaining > 0, future / remaining.clamp(min=1), 0.0)
        if teacher_mix > 0:
            mix = torch.tensor([1.0 - teacher_mix, teacher_mix], device=logq_y.device)
            log_mixed = torch.logsumexp(
                torch.stack([logq_y + mix[0].log(), logp_y + mix[1].log()]), dim=0
            )
            weight = (logq_y - log_mixed).exp()  # q/p̃ ≤ 1/(1−α)
        else:
            weight = torch.ones_like(logq_y)
        if importance_clip is not None:
            weight = weight.clamp(max=float(importance_clip))
        weight = weight * mask_f

    def per_position(s: torch.Tensor, terms: list[torch.Tensor]) -> torch.Tensor:
        zt, yt, w, c = terms  # (n, V), (n,), (n,), (n,)
        logq = torch.log_softmax(s.float() / temperature, dim=-1)  # (n, V)
        logp = torch.log_softmax(zt.float() / temperature, dim=-1)
        kl = (logq.exp() * (logq - logp)).sum(-1)  # (n,) exact next-token KL(q ‖ p)
        return w * kl - c * logq.gather(-1, yt[:, None]).squeeze(-1)

    # Pass 2: Σ_t w_t·KL(q_t ‖ p_t) − w_t·R̄_{t+1}·log q_t(y_t), with w and R̄ constants.
    surrogate = chunked_sum(student_logits, [teacher_logits, y, weight, weight * future],
                            per_position, mask=mask, chunk_size=chunk_size)  # fmt: skip
    return surrogate, rkl


@register_method
class MiniLLM(Method):
    """Reverse-KL policy gradient on teacher-mixed student samples (module docstring)."""

    name = "minillm"
    args = MiniLLMArgs
    prefetch_ahead = False  # samples depend on the current weights

    def __init__(self) -> None:
        self._sampler = StudentSampler("minillm")
        self._teacher: torch.nn.Module | None = None

    def reference_roles(self, config: TrainConfig) -> tuple[str, ...]:
        return ("teacher_ft",)

    def validate(self, config: TrainConfig) -> None:
        if config.on_policy_ratio > 0:
            raise ConfigError(
                f"config field 'on_policy_ratio' = {config.on_policy_ratio!r} is not allowed "
                "with method 'minillm': it always trains on the student's own samples; set "
                "on_policy_ratio=0 (the default)."
            )
        super().validate(config)
        if config.references == "cache":
            raise ConfigError(
                "config field 'references' = 'cache' is not allowed with method 'minillm': "
                "the cache holds targets for the dataset's fixed sequences, not for the "
                "student's fresh samples; use references: local or servers."
            )
        if config.lam != 0.0:
            raise ConfigError(
                f"config field 'lam' = {config.lam!r} is not allowed with method 'minillm': "
                "this build has no pretraining / SFT term in MiniLLM's loss; set lam=0."
            )
        if config.references == "local" and not config.teacher_ft:
            raise ConfigError(
                "config field 'teacher_ft' = None is not allowed: method 'minillm' needs the "
                "finetuned teacher (set teacher_ft=PATH)."
            )
        minillm_settings(config)

    def _teacher_model(self, trainer: DistillTrainer) -> torch.nn.Module:
        models = getattr(trainer.references, "models", None)
        if isinstance(models, dict) and "teacher_ft" in models:
            return models["teacher_ft"]
        if self._teacher is None:
            # Servers / cache answer whole sequences; mixed sampling needs the teacher's
            # distribution at every decoding step, so keep a local copy for sampling.
            from deltakd.loading import load_model

            config = trainer.config
            if not config.teacher_ft:
                raise ConfigError(
                    "method 'minillm' with teacher_mix > 0 needs teacher_ft=PATH to sample "
                    "from the teacher-mixed distribution (or set method_args.teacher_mix=0)."
                )
            student = next(trainer.model.parameters())
            self._teacher = load_model(config.teacher_ft, dtype=student.dtype, role="teacher_ft",
                                       device=student.device, frozen=True,
                                       trust_remote_code=config.trust_remote_code)  # fmt: skip
        return self._teacher

    def prepare_batch(
        self, trainer: DistillTrainer, model: torch.nn.Module, inputs: dict[str, Any]
    ) -> dict[str, Any]:
        s = minillm_settings(trainer.config)
        mix = float(s.teacher_mix)
        teacher = self._teacher_model(trainer) if mix > 0 else None
        gen = self._sampler.generator(trainer, inputs["input_ids"].device)
        return self._sampler.sample(
            trainer,
            model,
            inputs,
            gen,
            temperature=trainer.config.temperature,
            teacher=teacher,
            teacher_mix=mix,
        )

    def compute(
        self, batch: StudentBatch, refs: RoleLogits | None, config: TrainConfig
    ) -> LossTerms:
        assert refs is not None
        s = minillm_settings(config)
        surrogate, rkl = minillm_terms(
            batch.student_logits,
            refs.logits("teacher_ft"),
            batch.labels,
            batch.mask,
            temperature=config.temperature,
            teacher_mix=float(s.teacher_mix),
            importance_clip=s.importance_clip,
            length_norm=s.length_norm,
            chunk_size=config.chunk_size,
        )
        return LossTerms(total=surrogate, kd=rkl)
