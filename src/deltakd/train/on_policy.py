"""On-policy distillation (GKD, Agarwal et al. 2024, arXiv 2306.13649) for `kd` and `delta_kd`.

With probability `on_policy_ratio` per micro-batch, the batch's dataset responses are replaced
by responses the student samples itself from the same prompts; the reference models then score
those new token ids (the trainer hands the rewritten batch to the `ReferenceSource`) and the
configured KD / Delta-KD loss is taken on the sampled tokens only. With `on_policy_ratio: 0`
nothing changes: the batch, the references and the loss are those of the off-policy run.

How a micro-batch is rewritten (`prepare_batch`, before the references and the forward pass):

1. prompt = the row's tokens before its last assistant turn (the chat template's generation
   prompt included), left-truncated to `max_prompt_length` tokens;
2. the student samples at most `min(max_new_tokens, max_length − longest prompt)` tokens per
   row at temperature `method_args.sample_temperature` (default: `temperature`, GKD's
   choice), stopping at the tokenizer's eos / `<|im_end|>` (`deltakd.generation`'s stop
   tokens), which is kept;
3. rows become `prompt + sample`, right-padded like the collator's; `assistant_mask` (hence the
   loss mask and the token count normalising the loss) covers the sampled tokens only, up to and
   including the stop token. (With `lam > 0` the SFT term of such a batch is the student's
   negative log-likelihood of its own samples; GKD uses `lam: 0`.)

Reproducibility: each micro-batch's coin flip and samples come from a `torch.Generator` seeded
from (`seed`, optimizer step, micro-batch index within the step, process index), never from the
global RNG, so a fixed seed gives identical samples and a resumed run draws exactly what the
uninterrupted run drew. Sampling needs the current weights, so these methods turn off the
trainer's look-ahead prefetch of the next step's references when `on_policy_ratio > 0`.

`sample_responses` (a KV-cached sampling loop over the student, optionally mixed with a
teacher's next-token distribution) is shared with MiniLLM's teacher-mixed sampling.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from deltakd.config.fields import Section, bad, help_meta
from deltakd.errors import ConfigError
from deltakd.train.methods import KD, DeltaKD, method_arguments, register_method

if TYPE_CHECKING:
    from deltakd.train.config import TrainConfig
    from deltakd.train.trainer import DistillTrainer


@dataclass(eq=True)
class OnPolicyArgs(Section):
    """`method_args` of `kd` / `delta_kd` with `on_policy_ratio > 0`."""

    key: ClassVar[str] = "method_args"

    sample_temperature: float | None = field(
        default=None,
        metadata=help_meta(
            "the student's sampling temperature (> 0) for on-policy batches",
            default_text="`temperature`",
        ),
    )

    def validate(self) -> None:
        t = self.sample_temperature
        if t is not None and (not t > 0 or t == float("inf")):
            raise bad("method_args.sample_temperature", t,
                      "a finite number > 0 (the student's sampling temperature)")  # fmt: skip


#: method_args keys the on-policy mode reads (for kd and delta_kd)
ON_POLICY_ARGS: tuple[str, ...] = ("sample_temperature",)


# --- sampling ------------------------------------------------------------------------------


def batch_generator(
    seed: int, step: int, micro: int, rank: int, salt: str, device: torch.device
) -> torch.Generator:
    """A generator seeded from where the micro-batch sits in training (resume-exact)."""
    digest = hashlib.sha256(f"{salt}:{seed}:{step}:{micro}:{rank}".encode()).digest()
    gen = torch.Generator(device=device)
    gen.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return gen


def prompts_from_batch(inputs: dict[str, Any], max_prompt_length: int) -> list[list[int]]:
    """Each row's tokens before its last assistant turn, keeping the last `max_prompt_length`.

    `inputs` is a collated, right-padded micro-batch (`input_ids`, `attention_mask`,
    `assistant_mask`, each (B, T)).
    """
    ids = inputs["input_ids"].tolist()
    attn = inputs["attention_mask"].tolist()
    amask = inputs["assistant_mask"].bool().tolist()
    prompts = []
    for row, att, am in zip(ids, attn, amask, strict=True):
        n = int(sum(att))
        am = am[:n]
        starts = [j for j in range(1, n) if am[j] and not am[j - 1]]
        cut = starts[-1] if starts else n
        prompts.append(row[:cut][-max_prompt_length:])
    return prompts


@torch.no_grad()
def sample_responses(
    student: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    pad_id: int,
    vocab_size: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    teacher: torch.nn.Module | None = None,
    teacher_mix: float = 0.0,
    greedy: bool = False,
) -> list[list[int]]:
    """Sample one response per prompt, token by token with a KV cache.

    The next token is drawn from `p̃ = teacher_mix · p_teacher + (1 − teacher_mix) · q_student`,
    both softmaxes at `temperature` over the first `vocab_size` logits (teacher_mix = 0: the
    student alone, and the teacher is not run). `greedy` takes the argmax of p̃ instead. Prompts
    are left-padded so every row decodes at the same step. Each response ends with its stop
    token when one was drawn (it is kept), else after `max_new_tokens` tokens.
    """
    if not prompts:
        return []
    if not 0.0 <= teacher_mix <= 1.0:
        raise ConfigError(f"teacher_mix={teacher_mix}: must be in [0, 1].")
    if teacher_mix > 0 and teacher is None:
        raise ConfigError("teacher-mixed sampling (teacher_mix > 0) needs the teacher model.")
    device = next(student.parameters()).device
    b = len(prompts)
    width = max(len(p) for p in prompts)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long, device=device)  # (B, P)
    attention = torch.zeros((b, width), dtype=torch.long, device=device)  # (B, P)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        attention[i, width - len(p) :] = 1
    # Left padding shifts positions; count them from each row's first real token.
    positions = (attention.cumsum(-1) - 1).clamp(min=0)  # (B, P)

    models: list[torch.nn.Module] = [student]
    if teacher_mix > 0 and teacher is not None:
        models.append(teacher)
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    caches: list[Any] = [None] * len(models)
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    tokens: list[torch.Tensor] = []
    step_ids = input_ids
    log_mix = (
        torch.log(torch.tensor([1.0 - teacher_mix, teacher_mix], device=device))
        if len(models) == 2
        else None
    )
    try:
        for _ in range(max_new_tokens):
            logps = []
            for k, model in enumerate(models):
                out = model(
                    input_ids=step_ids,
                    attention_mask=attention,
                    position_ids=positions,
                    past_key_values=caches[k],
                    use_cache=True,
                )
                caches[k] = out.past_key_values
                z = out.logits[:, -1, :vocab_size].float() / temperature  # (B, V)
                logps.append(torch.log_softmax(z, dim=-1))
            if log_mix is not None:
                # log(α·p + (1−α)·q) without leaving log space (α = 1 gives −inf + finite).
                logp = torch.logsumexp(
                    torch.stack([logps[0] + log_mix[0], logps[1] + log_mix[1]]), dim=0
                )
            else:
                logp = logps[0]
            if greedy:
                nxt = logp.argmax(dim=-1)  # (B,)
            else:
                nxt = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            tokens.append(nxt)
            done = done | torch.isin(nxt, stops)
            if bool(done.all()):
                break
            step_ids = nxt[:, None]
            attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
            positions = positions[:, -1:] + 1
    finally:
        for m, mode in zip(models, modes, strict=True):
            m.train(mode)
    new = torch.stack(tokens, dim=1).tolist()  # (B, n)
    stop_set = set(int(s) for s in stop_ids)
    responses = []
    for row in new:
        out_row: list[int] = []
        for t in row:
            out_row.append(int(t))
            if t in stop_set:
                break
        responses.append(out_row)
    return responses


def build_sampled_batch(
    inputs: dict[str, Any],
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    pad_id: int,
) -> dict[str, Any]:
    """Right-padded `prompt + response` rows with `assistant_mask` on the responses only.

    Keys as `ChatCollator`'s (`input_ids`, `attention_mask`, `assistant_mask`, `labels`,
    `row_index`), on the device of `inputs["input_ids"]`, plus `on_policy` (B,) bool = True.
    """
    device = inputs["input_ids"].device
    b = len(prompts)
    width = max(len(p) + len(r) for p, r in zip(prompts, responses, strict=True))
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)  # (B, T)
    attention = torch.zeros((b, width), dtype=torch.long)  # (B, T)
    amask = torch.zeros((b, width), dtype=torch.bool)  # (B, T)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        n = len(p) + len(r)
        input_ids[i, :n] = torch.tensor(list(p) + list(r), dtype=torch.long)
        attention[i, :n] = 1
        amask[i, len(p) : n] = True
    out = dict(inputs)
    out.update(
        input_ids=input_ids.to(device),
        attention_mask=attention.to(device),
        assistant_mask=amask.to(device),
        labels=input_ids.masked_fill(~amask, -100).to(device),
        on_policy=torch.ones(b, dtype=torch.bool, device=device),
    )
    return out


class StudentSampler:
    """Per-micro-batch sampling state shared by on-policy KD and MiniLLM.

    Counts micro-batches within an optimizer step so each gets its own resume-exact generator.
    """

    def __init__(self, salt: str) -> None:
        self.salt = salt
        self._step = -1
        self._micro = 0
        self._engine: Any = None  # the colocated vLLM engine (generation.backend: vllm)
        self._synced_step = -1
        #: seconds each weight sync into the vLLM engine took
        self.sync_seconds: list[float] = []

    def generator(self, trainer: DistillTrainer, device: torch.device) -> torch.Generator:
        step = int(trainer.state.global_step)
        if step != self._step:
            self._step, self._micro = step, 0
        gen = batch_generator(
            trainer.config.seed, step, self._micro, trainer.args.process_index, self.salt, device
        )
        self._micro += 1
        return gen

    def sample(
        self,
        trainer: DistillTrainer,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        generator: torch.Generator,
        *,
        temperature: float,
        teacher: torch.nn.Module | None = None,
        teacher_mix: float = 0.0,
        backend: str = "hf",
    ) -> dict[str, Any]:
        """The micro-batch with its responses replaced by samples (see module docstring).

        `backend="vllm"` samples from a vLLM engine in this process whose weights are the
        student's (copied in once per optimizer step); teacher-mixed sampling stays on hf."""
        from deltakd.generation import stop_token_ids

        config = trainer.config
        tokenizer = trainer.processing_class
        stops = stop_token_ids(tokenizer)
        pad_id = tokenizer.pad_token_id
        if pad_id is None:
            pad_id = stops[0] if stops else 0
        prompts = prompts_from_batch(inputs, config.max_prompt_length)
        budget = min(config.max_new_tokens, config.max_length - max(len(p) for p in prompts))
        if backend == "vllm" and teacher_mix == 0:
            responses = self._vllm_sample(
                trainer, model, prompts, generator,
                max_new_tokens=max(budget, 1), stop_ids=stops, temperature=temperature,
            )  # fmt: skip
            return build_sampled_batch(inputs, prompts, responses, pad_id)
        responses = sample_responses(
            model,
            prompts,
            max_new_tokens=max(budget, 1),
            stop_ids=stops,
            pad_id=pad_id,
            vocab_size=trainer.vocab_size,
            temperature=temperature,
            generator=generator,
            teacher=teacher,
            teacher_mix=teacher_mix,
        )
        return build_sampled_batch(inputs, prompts, responses, pad_id)

    def _vllm_sample(
        self,
        trainer: DistillTrainer,
        model: torch.nn.Module,
        prompts: Sequence[Sequence[int]],
        generator: torch.Generator,
        *,
        max_new_tokens: int,
        stop_ids: Sequence[int],
        temperature: float,
    ) -> list[list[int]]:
        """Sample from the colocated engine (built on first use from the student itself)."""
        from deltakd.generation.vllm import VLLMEngine, backend_from_section

        student = trainer.accelerator.unwrap_model(model)
        step = int(trainer.state.global_step)
        if self._engine is None:
            _, settings = backend_from_section(trainer.config.generation)
            self._engine = VLLMEngine.from_model(student, settings)
            self._synced_step = step
        elif self._synced_step != step:
            # The weights change once per optimizer step; micro-batches of a step share them.
            self.sync_seconds.append(self._engine.load_weights(student.state_dict()))
            self._synced_step = step
        # One draw from the micro-batch's own generator seeds the engine's per-prompt seeds, so
        # samples stay reproducible and resume-exact as with hf.
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
        raw = self._engine.generate_ids(
            prompts,
            max_new_tokens=max_new_tokens,
            stop_ids=stop_ids,
            temperature=temperature,
            seed=seed,
            vocab_size=trainer.vocab_size,
        )
        return [ids for ids, _ in raw]


def _sample_temperature(config: TrainConfig) -> float:
    args = method_arguments(config.method, OnPolicyArgs, config.method_args)
    t = args.sample_temperature  # type: ignore[attr-defined]
    return float(t) if t is not None else float(config.temperature)


class _OnPolicyMixin:
    """`prepare_batch` that samples a fraction `on_policy_ratio` of the micro-batches."""

    supports_on_policy = True
    #: read only with `on_policy_ratio > 0` (then checked in `validate`)
    args = OnPolicyArgs
    name: str

    def validate(self, config: TrainConfig) -> None:
        super().validate(config)  # type: ignore[misc]
        if config.on_policy_ratio > 0:
            if config.references == "cache":
                raise ConfigError(
                    f"config field 'on_policy_ratio' = {config.on_policy_ratio!r} is not "
                    "allowed with references: cache: the cache holds targets for the dataset's "
                    "fixed sequences, not for the student's samples; use references: local or "
                    "servers, or on_policy_ratio=0."
                )
            _sample_temperature(config)
        from deltakd.generation.vllm import backend_from_section, check_head_size

        backend, _ = backend_from_section(config.generation)
        if config.on_policy_ratio > 0 and backend == "vllm":
            # Refused here, before data and models load, rather than at the first sampling step.
            check_head_size(
                config.student_raw,
                what=f"the on-policy student student_raw={config.student_raw!r} (generation."
                "backend=vllm samples it)",
                trust_remote_code=config.trust_remote_code,
            )

    def prefetches_ahead(self, config: TrainConfig) -> bool:
        # Samples depend on the current weights: the next step's micro-batches must not be
        # drawn (and sampled) before this step's update.
        return config.on_policy_ratio <= 0 and super().prefetches_ahead(config)  # type: ignore[misc]

    def prepare_batch(
        self, trainer: DistillTrainer, model: torch.nn.Module, inputs: dict[str, Any]
    ) -> dict[str, Any]:
        ratio = trainer.config.on_policy_ratio
        if ratio <= 0:
            return inputs
        sampler: StudentSampler = self.__dict__.setdefault("_sampler", StudentSampler("gkd"))
        gen = sampler.generator(trainer, inputs["input_ids"].device)
        if ratio < 1.0:
            coin = torch.rand((), generator=gen, device=inputs["input_ids"].device)
            if float(coin) >= ratio:
                return inputs
        from deltakd.generation.vllm import backend_from_section

        return sampler.sample(
            trainer, model, inputs, gen, temperature=_sample_temperature(trainer.config),
            backend=backend_from_section(trainer.config.generation)[0],
        )  # fmt: skip


@register_method
class OnPolicyKD(_OnPolicyMixin, KD):
    """`kd`, with GKD-style on-policy batches when `on_policy_ratio > 0`."""

    name = "kd"


@register_method
class OnPolicyDeltaKD(_OnPolicyMixin, DeltaKD):
    """`delta_kd`, with GKD-style on-policy batches when `on_policy_ratio > 0`."""

    name = "delta_kd"
