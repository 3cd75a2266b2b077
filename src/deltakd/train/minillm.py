"""MiniLLM (Gu et al., "MiniLLM: Knowledge Distillation of Large Language Models", ICLR 2024,
arXiv 2306.08543): minimise the sequence-level reverse KL `KL(q_θ ‖ p)` of the student q_θ to
the finetuned teacher p by policy gradient on the student's own samples, as the authors'
code runs it (LMOps `minillm/`: PPO over stored rollouts, whitened advantages, a pretraining
loss), with the differences listed at the end.

Notation, for a prompt x and a sampled response y = y_1..y_T (the generated tokens, stop token
included): q_t(·) = q_θ(· | y_<t, x) and p_t(·) = p(· | y_<t, x), both softmaxes at the config's
`temperature` τ over the shared vocabulary. The per-token reward is

    r_t = log p_t(y_t) − log q_old,t(y_t)

(q_old: the student when the rollout was sampled) and `KL(q_θ ‖ p) = −E_{y∼q_θ}[Σ_t r_t]`. Its
gradient (the paper's Eq. 2–5) splits into

    ∇L = (∇L)_Single + (∇L)_Long
    (∇L)_Single =  E[ Σ_t w_t ∇ KL(q_t ‖ p_t) ]                (single-step decomposition)
    (∇L)_Long   = −E[ Σ_t w_t A_t ∇ log q_t(y_t) ]

(a) single-step decomposition: the next-token reverse KL `KL(q_t ‖ p_t) = Σ_v q_t(v) (log q_t(v)
    − log p_t(v))` is computed exactly over the vocabulary and differentiated directly (no PPO
    ratio on it, as in the authors' code); the policy gradient carries the long-term part.
(b) teacher-mixed sampling: responses are drawn from p̃_t = α_mix·p_t + (1 − α_mix)·q_old,t
    (`method_args.teacher_mix`, the paper's α = 0.2) and re-weighted by the single-step
    importance weight w_t = q_old,t(y_t) / p̃_t(y_t) (at most 1/(1 − α_mix)). The clip of w at
    `method_args.importance_clip` is off by default (null): it is in neither the paper nor
    its code; 1.0 restores deltakd's earlier behaviour.
(c) length normalisation: R̄_{t+1} = (1 / (T − t)) Σ_{t'=t+1..T} r_{t'}, the mean of the future
    rewards instead of their sum (`method_args.length_norm`; false uses the plain sum).
    R̄_{T+1} = 0. The advantage is A_t = R̄_{t+1}, whitened (`method_args.advantage_norm`, the
    authors' `whiten`): A ← (A − mean) / sqrt(var + 1e-8) over the micro-batch's response tokens.
(d) PPO: a rollout (the samples of one optimizer step's micro-batches, their q_old and hence
    their rewards, weights and advantages) is used for `method_args.ppo_epochs` optimizer steps
    (authors: 4). With ρ_t = q_θ,t(y_t) / q_old,t(y_t) the policy term is PPO's clipped
    objective `w_t · max(−A_t ρ_t, −A_t clip(ρ_t, 1 − ε, 1 + ε))`, ε = `method_args.cliprange`
    (authors: 0.2; null: no clip). At the first update ρ = 1 and it is the plain policy gradient.
(e) pretraining loss: with `method_args.pt_dataset` (a plain-text spec, e.g. `mini:corpus`), each
    micro-batch carries `per_device_batch_size` documents of it, scored by the student's LM
    cross-entropy in the same forward pass (authors: `lm_coef` 1 on their pretraining corpus);
    weighted `method_args.pt_weight` against the token-mean of the MiniLLM terms, and logged as
    `sft_loss`.

The surrogate minimised per micro-batch (w, A and q_old are constants, i.e. detached) is

    Σ_{counted t} [ w_t · KL(q_t ‖ p_t)  +  w_t · (max(−A_t ρ_t, −A_t clip(ρ_t)) + A_t (1 − log q_old,t(y_t))) ]
      + pt_weight · mean_pt_tokens(CE) · (response tokens of the micro-batch)

divided by the response tokens of the accumulated batch, like every method. The constant
`A_t (1 − log q_old,t(y_t))` has no gradient; it makes the value at ρ = 1 the policy-gradient
surrogate `−w_t A_t log q_t(y_t)` that earlier versions logged. The logged `kd_loss` is the mean
exact next-token reverse KL `KL(q_t ‖ p_t)` on the student's samples.

Start from an SFT'd student, as the authors do: `student_raw` is simply that checkpoint (e.g.
`deltakd train configs/mini/sft.yaml`, then `student_raw=runs/mini/sft/final`; docs/USAGE.md).

What still differs from the authors' code (named, not hidden):
- a rollout is one optimizer step's accumulated micro-batches, reused whole and in order for
  `ppo_epochs` steps (the authors draw `num_rollouts` = 256 prompts and iterate shuffled
  mini-batches over them); the dataset rows drawn for the steps that reuse a rollout are
  skipped, so the data position (and resume) stays the HF Trainer's;
- the clip acts on ρ alone with w a fixed weight (the authors clip the product w·ρ, which at
  the first update already drops the gradient of tokens whose w lies outside [1 − ε, 1 + ε]);
  the single-step term keeps the paper's weight w_t (the authors' code leaves it unweighted);
- the future reward starts at t+1, undiscounted (the paper); the authors' code discounts with
  γ = 0.95 from t on, and divides rewards by `reward_scaling` 0.5 and clips them at ±100,
  which the whitening makes (almost) irrelevant;
- advantages are whitened per micro-batch on one process (the authors: per batch over the
  data-parallel ranks), over response tokens only (theirs include padding zeros);
- the pretraining term is the LM loss only (the authors' Qwen script also mixes in
  `kd_ratio` 0.5 of forward-KL distillation on the pretraining text); no value baseline;
  sampling uses no top-k / top-p;
- resume: the rollout lives in memory. A run resumed at a step that starts a rollout (a
  multiple of `ppo_epochs`) continues exactly as the uninterrupted run; one resumed mid-rollout
  samples a fresh rollout at once (same seeds as that step's, new weights) and is not
  bit-identical from there on;
- with `references: servers`, teacher-mixed sampling still needs the teacher's next-token
  distribution at every decoding step, so the method loads its own copy of teacher_ft in the
  training process (with `references: local` it reuses that model).

Prompts are the rows' prompts (the tokens before the last assistant turn, left-truncated to
`max_prompt_length`); responses are at most `max_new_tokens` long (see `deltakd.train.on_policy`
for the sampling loop, the batch layout and the resume-exact seeding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

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

#: micro-batch key of a stored rollout's `_RolloutSlot` (its q_old, filled at the first update)
ROLLOUT_KEY = "minillm_rollout"
#: micro-batch key of the (B, T) bool mask of pretraining-text tokens (rows appended after the
#: sampled ones)
PT_MASK_KEY = "pt_mask"


@dataclass(eq=True)
class MiniLLMArgs(Section):
    """`method_args` of `minillm` (defaults: the authors' settings, module docstring)."""

    key: ClassVar[str] = "method_args"

    teacher_mix: float = field(
        default=0.2,
        metadata=help_meta("the teacher's share α of the sampling mixture, in [0, 1) (paper: 0.2)"),
    )
    importance_clip: float | None = field(
        default=None,
        metadata=help_meta(
            "upper clip of the importance weight q/p̃ (> 0), or null for none (the paper's and "
            "its code's; 1.0 was deltakd's earlier default)"
        ),
    )
    length_norm: bool = field(
        default=True,
        metadata=help_meta("average the rewards over the response instead of summing them"),
    )
    ppo_epochs: int = field(
        default=4,
        metadata=help_meta(
            "optimizer steps per rollout: each sampled batch is reused for this many updates "
            "(authors: 4; 1 = sample every step)"
        ),
    )
    cliprange: float | None = field(
        default=0.2,
        metadata=help_meta(
            "PPO clip ε of the ratio q_θ/q_old to [1 − ε, 1 + ε] (> 0; authors: 0.2), or null "
            "for none"
        ),
    )
    advantage_norm: bool = field(
        default=True,
        metadata=help_meta(
            "whiten the advantages (zero mean, unit variance over the micro-batch's response "
            "tokens), as the authors' code does"
        ),
    )
    pt_dataset: str | None = field(
        default=None,
        metadata=help_meta(
            "plain-text corpus for the pretraining LM loss: `mini:corpus`, `mini2:corpus`, a "
            '.txt file (one document per line) or a .jsonl of {"text": ...}; null = no '
            "pretraining term"
        ),
    )
    pt_weight: float = field(
        default=1.0,
        metadata=help_meta(
            "weight (≥ 0) of the pretraining LM loss against the MiniLLM terms (authors' "
            "`lm_coef`: 1); used with pt_dataset"
        ),
    )

    def validate(self) -> None:
        if not 0.0 <= self.teacher_mix < 1.0:
            raise bad("method_args.teacher_mix", self.teacher_mix, "a number in [0, 1) (the "
                      "teacher's share α of the sampling mixture; paper: 0.2)")  # fmt: skip
        if self.importance_clip is not None and not self.importance_clip > 0:
            raise bad("method_args.importance_clip", self.importance_clip, "a number > 0 (upper "
                      "clip of the importance weight q/p̃), or null for no clip")  # fmt: skip
        if self.ppo_epochs < 1:
            raise bad("method_args.ppo_epochs", self.ppo_epochs,
                      "an integer >= 1 (optimizer steps per rollout; authors: 4)")  # fmt: skip
        if self.cliprange is not None and not self.cliprange > 0:
            raise bad("method_args.cliprange", self.cliprange,
                      "a number > 0 (PPO clip ε; authors: 0.2), or null for no clip")  # fmt: skip
        if not (self.pt_weight >= 0 and math.isfinite(self.pt_weight)):
            raise bad("method_args.pt_weight", self.pt_weight,
                      "a finite number >= 0 (weight of the pretraining LM loss)")  # fmt: skip
        if self.pt_dataset is not None:
            from deltakd.data.specs import check_text_spec
            from deltakd.errors import DataError

            try:
                check_text_spec(self.pt_dataset)
            except DataError as exc:
                raise ConfigError(f"config field 'method_args.pt_dataset': {exc}") from None


def minillm_settings(config: TrainConfig) -> MiniLLMArgs:
    """`method_args` as minillm's typed settings (defaults filled, values checked)."""
    return method_arguments("minillm", MiniLLMArgs, config.method_args)  # type: ignore[return-value]


class MiniLLMTerms(NamedTuple):
    """What `minillm_terms` returns (sums over counted positions)."""

    surrogate: torch.Tensor  # scalar, carries the gradient
    reverse_kl: torch.Tensor  # scalar Σ_t KL(q_t ‖ p_t), detached
    logq_y: torch.Tensor  # (B, T) log q_θ,t(y_t) now (detached; 0 where not counted)


def whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`(x − mean) / sqrt(var + 1e-8)` over the True entries of `mask` (unbiased variance, as
    `torch.var_mean`); 0 elsewhere. One counted entry has no spread: it becomes 0."""
    vals = x[mask]  # (n,)
    if vals.numel() < 2:
        return torch.zeros_like(x)
    var, mean = torch.var_mean(vals)
    return torch.where(mask, (x - mean) * torch.rsqrt(var + 1e-8), torch.zeros_like(x))


def ppo_policy_term(
    logq_y: torch.Tensor,
    old_logq_y: torch.Tensor,
    advantage: torch.Tensor,
    cliprange: float | None,
) -> torch.Tensor:
    """PPO's clipped policy loss per position, `max(−A ρ, −A clip(ρ, 1 − ε, 1 + ε))` with
    `ρ = exp(logq_y − old_logq_y)`; `cliprange=None` gives `−A ρ`. Gradient flows into `logq_y`
    only; on the clipped side (ρ outside [1 − ε, 1 + ε] where clipping lowers the loss' value)
    it is zero."""
    ratio = torch.exp(logq_y - old_logq_y)
    loss = -advantage * ratio
    if cliprange is None:
        return loss
    clipped = -advantage * ratio.clamp(1.0 - cliprange, 1.0 + cliprange)
    return torch.maximum(loss, clipped)


def minillm_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    teacher_mix: float = 0.2,
    importance_clip: float | None = None,
    length_norm: bool = True,
    advantage_norm: bool = True,
    cliprange: float | None = 0.2,
    old_logq: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> MiniLLMTerms:
    """MiniLLM's surrogate loss and the exact reverse KL, both summed over counted positions.

    Args:
        student_logits: (B, T, V) aligned so position t scores `labels[:, t]`.
        teacher_logits: (B, T, V) same alignment; no gradient flows into it.
        labels: (B, T) the sampled tokens y_t.
        mask: (B, T) bool, True on the sampled tokens (each row's response is one contiguous
            run; positions after it must be False).
        old_logq: (B, T) log q_old(y_t) of the student that sampled the rollout (later PPO
            updates), or None: the current student's (the rollout's first update).
        chunk_size: positions whose (n, V) softmaxes exist at once (None: all of them). The
            weights need every position's log q(y_t), log p(y_t) first, so the logits are
            read twice: once without gradient for the rewards, once for the surrogate.
    Returns:
        `MiniLLMTerms(surrogate, reverse_kl, logq_y)`; see the module docstring.
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
        old = logq_y if old_logq is None else old_logq.float() * mask_f  # (B, T) q_old(y_t)
        reward = (logp_y - old) * mask_f  # (B, T)
        # Returns from t+1 on: reverse cumulative sums minus the current term.
        future = reward.flip(-1).cumsum(-1).flip(-1) - reward  # (B, T)
        if length_norm:
            remaining = mask_f.flip(-1).cumsum(-1).flip(-1) - mask_f  # tokens after t
            future = torch.where(remaining > 0, future / remaining.clamp(min=1), 0.0)
        advantage = whiten(future, mask) if advantage_norm else future * mask_f
        if teacher_mix > 0:
            mix = torch.tensor([1.0 - teacher_mix, teacher_mix], device=old.device)
            log_mixed = torch.logsumexp(torch.stack([old + mix[0].log(), logp_y + mix[1].log()]),
                                        dim=0)  # fmt: skip
            weight = (old - log_mixed).exp()  # q/p̃ ≤ 1/(1−α)
        else:
            weight = torch.ones_like(old)
        if importance_clip is not None:
            weight = weight.clamp(max=float(importance_clip))
        weight = weight * mask_f

    def per_position(s: torch.Tensor, terms: list[torch.Tensor]) -> torch.Tensor:
        zt, yt, w, a, lq_old = terms  # (n, V), (n,), (n,), (n,), (n,)
        logq = torch.log_softmax(s.float() / temperature, dim=-1)  # (n, V)
        logp = torch.log_softmax(zt.float() / temperature, dim=-1)
        kl = (logq.exp() * (logq - logp)).sum(-1)  # (n,) exact next-token KL(q ‖ p)
        lq_y = logq.gather(-1, yt[:, None]).squeeze(-1)  # (n,)
        policy = ppo_policy_term(lq_y, lq_old, a, cliprange) + a * (1.0 - lq_old)
        return w * kl + w * policy

    # Pass 2: Σ_t w_t·KL(q_t ‖ p_t) + w_t·PPO policy term, with w, A and q_old constants.
    surrogate = chunked_sum(student_logits, [teacher_logits, y, weight, advantage, old],
                            per_position, mask=mask, chunk_size=chunk_size)  # fmt: skip
    return MiniLLMTerms(surrogate, rkl, logq_y)


class _RolloutSlot:
    """A stored rollout micro-batch's q_old(y_t) over its counted positions (row-major), set
    by its first update. A plain object: the HF Trainer passes it through `_prepare_inputs`."""

    def __init__(self) -> None:
        self.old_logq: torch.Tensor | None = None  # (n,)


def append_text_rows(inputs: dict[str, Any], texts: list[list[int]], pad_id: int) -> dict[str, Any]:
    """`inputs` (a right-padded micro-batch) with the token rows `texts` appended below it:
    no response tokens (`assistant_mask` False, so they count for nothing else), `PT_MASK_KEY`
    True on their tokens. Per-row tensors (B,) are extended with -1 / False."""
    ids = inputs["input_ids"]  # (B, T)
    b, t = ids.shape
    width = max(t, max(len(x) for x in texts))
    n = len(texts)
    device = ids.device

    def widen(x: torch.Tensor, fill: Any) -> torch.Tensor:
        out = torch.full((b, width), fill, dtype=x.dtype, device=device)
        out[:, :t] = x
        return out

    pt_ids = torch.full((n, width), pad_id, dtype=ids.dtype)
    pt_mask = torch.zeros((n, width), dtype=torch.bool)
    for i, row in enumerate(texts):
        pt_ids[i, : len(row)] = torch.tensor(row, dtype=ids.dtype)
        pt_mask[i, : len(row)] = True
    pt_ids, pt_mask = pt_ids.to(device), pt_mask.to(device)
    out = dict(inputs)
    out["input_ids"] = torch.cat([widen(ids, pad_id), pt_ids])
    out["attention_mask"] = torch.cat(
        [widen(inputs["attention_mask"], 0), pt_mask.to(inputs["attention_mask"].dtype)]
    )
    amask = inputs["assistant_mask"]
    out["assistant_mask"] = torch.cat(
        [widen(amask, 0), torch.zeros_like(pt_mask, dtype=amask.dtype)]
    )
    if "labels" in inputs:
        out["labels"] = torch.cat([widen(inputs["labels"], -100),
                                   torch.full_like(pt_ids, -100)])  # fmt: skip
    out[PT_MASK_KEY] = torch.cat(
        [torch.zeros((b, width), dtype=torch.bool, device=device), pt_mask]
    )
    for key, value in inputs.items():
        if key not in out or out[key] is not value:
            continue
        if torch.is_tensor(value) and value.dim() == 1 and value.shape[0] == b:
            fill = False if value.dtype == torch.bool else -1
            out[key] = torch.cat([value, torch.full((n,), fill, dtype=value.dtype, device=device)])
    return out


@register_method
class MiniLLM(Method):
    """Reverse-KL policy gradient (PPO) on teacher-mixed student samples (module docstring)."""

    name = "minillm"
    args = MiniLLMArgs
    prefetch_ahead = False  # samples depend on the current weights

    def __init__(self) -> None:
        self._sampler = StudentSampler("minillm")
        self._teacher: torch.nn.Module | None = None
        self._pos = (-1, 0)  # (optimizer step, micro-batch index in it) of the last call
        self._rollout: dict[int, dict[str, Any]] = {}  # micro index -> stored sampled batch
        self._rollout_step: int | None = None  # the step the rollout was sampled at
        self._pt_texts: list[str] | None = None
        self._pt_tokens: dict[int, list[int]] = {}

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
                "its loss has no SFT term on the dataset; the pretraining LM term is "
                "method_args.pt_dataset / pt_weight. Set lam=0."
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
        step = int(trainer.state.global_step)
        micro = self._pos[1] if self._pos[0] == step else 0
        self._pos = (step, micro + 1)
        k = int(s.ppo_epochs)
        reuse = (
            k > 1
            and self._rollout_step is not None
            and 0 < step - self._rollout_step < k
            and micro in self._rollout
        )
        if reuse:
            # The stored samples again (a copy: the trainer tags each micro-batch it draws);
            # this step's dataset rows are skipped.
            sampled = dict(self._rollout[micro])
        else:
            if micro == 0 or self._rollout_step != step:
                self._rollout, self._rollout_step = {}, step
            mix = float(s.teacher_mix)
            teacher = self._teacher_model(trainer) if mix > 0 else None
            gen = self._sampler.generator(trainer, inputs["input_ids"].device)
            sampled = self._sampler.sample(trainer, model, inputs, gen,
                                           temperature=trainer.config.temperature,
                                           teacher=teacher, teacher_mix=mix)  # fmt: skip
            if k > 1:
                sampled[ROLLOUT_KEY] = _RolloutSlot()
                self._rollout[micro] = sampled
                sampled = dict(sampled)
        if s.pt_dataset is not None and s.pt_weight > 0:
            sampled = self._with_pt_rows(trainer, sampled, s.pt_dataset, step, micro)
        return sampled

    def _with_pt_rows(self, trainer: DistillTrainer, batch: dict[str, Any], spec: str,
                      step: int, micro: int) -> dict[str, Any]:  # fmt: skip
        """`batch` with `per_device_batch_size` pretraining documents appended; which ones
        follows from (step, micro-batch, process), so a resumed run reads the same ones."""
        from deltakd.data.specs import load_texts

        if self._pt_texts is None:
            self._pt_texts = load_texts(spec)
        config = trainer.config
        n = config.per_device_batch_size
        slot = (step * config.gradient_accumulation_steps + micro) * trainer.args.world_size
        first = (slot + trainer.args.process_index) * n
        tokenizer = trainer.processing_class
        rows = []
        for j in range(first, first + n):
            i = j % len(self._pt_texts)
            if i not in self._pt_tokens:
                ids = tokenizer(self._pt_texts[i], add_special_tokens=False)["input_ids"]
                self._pt_tokens[i] = list(ids)[: config.max_length] or [tokenizer.eos_token_id]
            rows.append(self._pt_tokens[i])
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        return append_text_rows(batch, rows, pad)

    def compute(
        self, batch: StudentBatch, refs: RoleLogits | None, config: TrainConfig
    ) -> LossTerms:
        assert refs is not None
        s = minillm_settings(config)
        slot = batch.inputs.get(ROLLOUT_KEY)
        old = None
        if isinstance(slot, _RolloutSlot) and slot.old_logq is not None:
            old = torch.zeros(batch.mask.shape, dtype=torch.float32, device=batch.mask.device)
            old[batch.mask] = slot.old_logq.to(old.device)  # same samples: same positions
        terms = minillm_terms(
            batch.student_logits,
            refs.logits("teacher_ft"),
            batch.labels,
            batch.mask,
            temperature=config.temperature,
            teacher_mix=float(s.teacher_mix),
            importance_clip=s.importance_clip,
            length_norm=s.length_norm,
            advantage_norm=s.advantage_norm,
            cliprange=s.cliprange,
            old_logq=old,
            chunk_size=config.chunk_size,
        )
        if isinstance(slot, _RolloutSlot) and slot.old_logq is None:
            slot.old_logq = terms.logq_y[batch.mask].detach()  # the rollout's q_old
        total, sft = terms.surrogate, None
        pt = batch.inputs.get(PT_MASK_KEY)
        if pt is not None and s.pt_weight > 0:
            ce_mean = pt_lm_loss(batch.student_logits, batch.labels, pt)
            # Times the micro-batch's response tokens: after the trainer's division by the
            # step's response tokens this is pt_weight × the pretraining loss (a token-weighted
            # mean over micro-batches).
            n_rl = batch.mask.sum().to(ce_mean.dtype)
            total = total + float(s.pt_weight) * ce_mean * n_rl
            sft = ce_mean.detach() * n_rl  # logged as sft_loss: the pretraining LM loss
        return LossTerms(total=total, sft=sft, kd=terms.reverse_kl)


def pt_lm_loss(logits: torch.Tensor, labels: torch.Tensor, pt_mask: torch.Tensor) -> torch.Tensor:
    """Token-mean LM cross-entropy of `logits` (B, T-1, V) against `labels` (B, T-1) on the
    pretraining rows' tokens (`pt_mask` (B, T): both the position and its next token are text).
    0 (with a zero gradient) when there is none."""
    m = pt_mask[:, :-1] & pt_mask[:, 1:]  # (B, T-1)
    n = int(m.sum())
    if n == 0:
        return logits.sum() * 0.0
    ce = torch.nn.functional.cross_entropy(logits[m].float(), labels[m], reduction="sum")
    return ce / n
