"""The training config schema: `TrainConfig`, one typed dataclass with typed sections.

Every field carries its help text, its allowed values and its group in `metadata`
(`deltakd.config.fields`), so the same schema validates user input, names the field and the
fix in every refusal and generates the config reference in docs/USAGE.md
(`deltakd.config.reference`), which therefore cannot drift. Reading YAML and `key=value`
overrides is `deltakd.config.overrides`.

This package sits at the bottom of deltakd (docs/ARCHITECTURE.md). Its one reach upward is
the method registry (`deltakd.train.methods`), imported inside functions, through which each
method checks the settings it uses.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from deltakd.config.fields import (
    bad,
    check_choices,
    coerce,
    field_types,
    in_range,
    positive,
)
from deltakd.config.fields import (
    help_meta as _help,
)
from deltakd.config.sections import CacheSection, GenerationSection, PeftSection, ServersSection

# The losses module defines the divergences; mirrored here so `deltakd --help`-level code does
# not import torch. A test checks the two stay equal.
DIVERGENCE_NAMES: tuple[str, ...] = ("fkl", "rkl", "jsd", "skl", "srkl", "tvd")
REFERENCE_KINDS: tuple[str, ...] = ("local", "servers", "cache")
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")
SCHEDULES: tuple[str, ...] = ("cosine", "linear", "constant")
REPORTERS: tuple[str, ...] = ("none", "tensorboard", "wandb", "csv")


def _method_names() -> tuple[str, ...]:
    # Imported lazily: the method registry imports torch, the config must not at import time.
    from deltakd.train.methods import method_names

    return method_names()


@dataclass
class TrainConfig:
    """Everything one `deltakd train` run needs. See docs/USAGE.md for the generated reference."""

    #: refuse a config without model paths (False in `DeltaKDConfig`: the trainer gets objects)
    _require_models: ClassVar[bool] = True

    # --- models ---------------------------------------------------------------------------
    student_raw: str = field(
        default="",
        metadata=_help(
            "Path or Hub name of the student's pretrained (base) checkpoint. The student starts "
            "from it unless `student` is set; it is also the `student_raw` reference for delta_kd.",
            group="models",
        ),
    )
    teacher_ft: str | None = field(
        default=None,
        metadata=_help(
            "Path or Hub name of the finetuned (SFT) teacher. Needed by every method except sft.",
            group="models",
        ),
    )
    teacher_raw: str | None = field(
        default=None,
        metadata=_help(
            "Path or Hub name of the teacher's pretrained (base) checkpoint. Needed by delta_kd and "
            "the parallelogram variants that use it.",
            group="models",
        ),
    )
    teacher_ft2: str | None = field(
        default=None,
        metadata=_help(
            "Optional second finetuned teacher, for parallelogram variants that average two teachers.",
            group="models",
        ),
    )
    student: str | None = field(
        default=None,
        metadata=_help(
            "Where the trainable student starts. Default: `student_raw` (the paper's setting).",
            group="models",
        ),
    )
    tokenizer: str | None = field(
        default=None,
        metadata=_help(
            "Tokenizer path or Hub name. Default: the student's. All roles must share it "
            "(checked; embedding rows beyond the tokenizer are sliced off).",
            group="models",
        ),
    )
    trust_remote_code: bool = field(
        default=False,
        metadata=_help("Passed to `from_pretrained` for models and tokenizer.", group="models"),
    )
    peft: PeftSection = field(
        default_factory=PeftSection,
        metadata=_help(
            "LoRA adapters on the student through `peft` (set `peft.r`); the `peft.*` rows below.",
            group="models",
        ),
    )

    # --- data -----------------------------------------------------------------------------
    dataset: str = field(
        default="mini:instruct",
        metadata=_help(
            "Dataset spec: `mini:instruct`, `mini:math`, a JSONL file (rows with `messages`, or "
            "`prompt` + `response`; `{split}` in the path is replaced by the split), "
            "`ultrachat:<hub name or path>` or `openmath:<hub name or path>`; or a mixture "
            "`A+B` whose rows are interleaved (e.g. `mini:instruct+mini:math`).",
            group="data",
        ),
    )
    train_split: str | None = field(
        default=None,
        metadata=_help(
            "Split to train on. Default per spec: mini `train`, ultrachat `train_sft`, openmath "
            "`cot`; JSONL files ignore it unless their path contains `{split}` (then `train`).",
            group="data",
        ),
    )
    limit: int | None = field(
        default=None,
        metadata=_help(
            "Use at most this many training rows (after loading, before shuffling).", group="data"
        ),
    )
    max_length: int = field(
        default=1024,
        metadata=_help(
            "Maximum tokens per row (prompt + response) after the chat template.", group="data"
        ),
    )
    truncation: str = field(
        default="drop",
        metadata=_help(
            "What to do with rows longer than `max_length`: `drop` them (counted and reported, "
            "with the tokens they held), `truncate` them (counted and reported; a cut reply "
            "loses its answer and its stop token) or stop with an `error`.",
            choices=("truncate", "drop", "error"),
            group="data",
        ),
    )
    max_prompt_length: int | None = field(
        default=None,
        metadata=_help(
            "Maximum prompt tokens for methods that generate (seqkd, minillm, on-policy); "
            "below `max_length`. Default: half of `max_length`.",
            group="data",
        ),
    )
    max_new_tokens: int = field(
        default=256,
        metadata=_help("Maximum generated tokens for methods that generate.", group="data"),
    )
    shuffle: bool = field(
        default=True,
        metadata=_help("Shuffle the training rows each epoch (seeded by `seed`).", group="data"),
    )
    group_by_length: bool = field(
        default=False,
        metadata=_help(
            "Batch rows of similar length together (transformers' `LengthGroupedSampler`, still "
            "seeded and shuffled) so batches carry less padding; the padding fraction is logged "
            "as `pad_fraction`.",
            group="data",
        ),
    )

    # --- method ---------------------------------------------------------------------------
    method: str = field(
        default="delta_kd",
        metadata=_help(
            "Training method: `sft` (cross-entropy on the data), `kd` (a divergence to teacher_ft), "
            "`delta_kd` (a divergence to z* = z_ft + α(z_student_raw − z_teacher_raw)), "
            "`parallelogram` (a named `variant`), and the methods registered by plug-ins.",
            choices=_method_names,
            group="method",
        ),
    )
    alpha: float = field(
        default=1.0,
        metadata=_help(
            "Delta-KD shift weight α (0 = plain KD on teacher_ft, 1 = full shift).", group="method"
        ),
    )
    lam: float = field(
        default=0.0,
        metadata=_help(
            "λ, the weight of the SFT loss: L = λ·SFT + (1−λ)·KD. In [0, 1]. Ignored by `sft`.",
            group="method",
        ),
    )
    temperature: float = field(
        default=1.0,
        metadata=_help("Softmax temperature τ of target and student (> 0).", group="method"),
    )
    beta: float = field(
        default=0.5,
        metadata=_help("β of the jsd / skl / srkl divergences, in [0, 1].", group="method"),
    )
    divergence: str | None = field(
        default=None,
        metadata=_help(
            "Divergence D(target, student) (docs/LOSSES.md). Default: `fkl`, or the "
            "parallelogram variant's own (`delta_rkl`: `rkl`); an explicit value always wins.",
            choices=DIVERGENCE_NAMES,
            group="method",
        ),
    )
    variant: str | None = field(
        default=None,
        metadata=_help(
            "Parallelogram variant name (method `parallelogram`); see "
            "`deltakd.losses.PARALLELOGRAM_VARIANTS`.",
            group="method",
        ),
    )
    delta_floor: float | None = field(
        default=None,
        metadata=_help(
            "Robust Delta-KD: floor the raw models' log-probabilities (at temperature τ) at this "
            "value before differencing, z*/τ = z_ft/τ + α(max(log π_student_raw, f) − "
            "max(log π_teacher_raw, f)); e.g. -8. Negative; null = off. Only for `delta_kd` and "
            "the parallelogram variants with the shift α(z_student_raw − z_teacher_raw).",
            group="method",
        ),
    )
    on_policy_ratio: float = field(
        default=0.0,
        metadata=_help(
            "Fraction of batches whose responses the student samples itself (GKD-style "
            "on-policy distillation), in [0, 1]. 0 = the dataset's responses only.",
            group="method",
        ),
    )
    method_args: dict[str, Any] = field(
        default_factory=dict,
        metadata=_help(
            "Method-specific settings (e.g. for seqkd / minillm), documented with each method. "
            "Override one key with `method_args.KEY=VALUE`.",
            group="method",
        ),
    )

    # --- references -----------------------------------------------------------------------
    references: str = field(
        default="local",
        metadata=_help(
            "Where the frozen roles' outputs come from: `local` (models in this process), "
            "`servers` (teacher servers), `cache` (precomputed sparse targets).",
            choices=REFERENCE_KINDS,
            group="references",
        ),
    )
    servers: ServersSection = field(
        default_factory=ServersSection,
        metadata=_help(
            "Settings for `references: servers` (docs/USAGE.md, 'Teacher servers'); the "
            "`servers.*` rows below.",
            group="references",
        ),
    )
    cache: CacheSection = field(
        default_factory=CacheSection,
        metadata=_help(
            "Settings for `references: cache` (docs/USAGE.md, 'Offline target cache'); the "
            "`cache.*` rows below.",
            group="references",
        ),
    )
    generation: GenerationSection = field(
        default_factory=GenerationSection,
        metadata=_help(
            "Where SeqKD replies and on-policy samples are generated: `backend: hf | vllm` plus "
            "vLLM engine settings (docs/USAGE.md, 'Generation on vLLM'); the `generation.*` rows "
            "below.",
            group="references",
        ),
    )
    reference_dtype: str = field(
        default="auto",
        metadata=_help(
            "dtype of the local frozen models: `auto` follows `precision` (bf16/fp16 runs load "
            "references in that dtype, fp32 runs in fp32). A 16-bit reference's logits are its "
            "last hidden states times its lm_head with the product kept in float32 (not rounded "
            "to 16 bits as the model's own forward does: 1.4e-3 nats/token of Delta-KD target "
            "error in bf16 against 5e-5; docs/BENCHMARKS.md), except a server's `output: logits`.",
            choices=("auto", "fp32", "bf16", "fp16"),
            group="references",
        ),
    )
    fused_loss: bool = field(
        default=False,
        metadata=_help(
            "Compute the KD loss from the student's last hidden states chunk by chunk without "
            "materialising [B, T, V] logits (needs the fused-loss kernel).",
            group="references",
        ),
    )
    chunk_size: int | None = field(
        default=None,
        metadata=_help(
            "Positions per chunk inside the loss (bounds memory; the value does not change).",
            group="references",
        ),
    )

    # --- optimisation ---------------------------------------------------------------------
    learning_rate: float = field(
        default=1e-5, metadata=_help("AdamW peak learning rate (> 0).", group="optimisation")
    )
    weight_decay: float = field(
        default=0.0, metadata=_help("AdamW weight decay (>= 0).", group="optimisation")
    )
    adam_beta1: float = field(
        default=0.9, metadata=_help("AdamW β1 in [0, 1).", group="optimisation")
    )
    adam_beta2: float = field(
        default=0.999, metadata=_help("AdamW β2 in [0, 1).", group="optimisation")
    )
    adam_epsilon: float = field(
        default=1e-8, metadata=_help("AdamW ε (> 0).", group="optimisation")
    )
    lr_scheduler: str = field(
        default="cosine",
        metadata=_help(
            "Learning-rate schedule after warmup.", choices=SCHEDULES, group="optimisation"
        ),
    )
    warmup_ratio: float = field(
        default=0.0,
        metadata=_help(
            "Linear warmup over this fraction of the steps, in [0, 1).", group="optimisation"
        ),
    )
    warmup_steps: int = field(
        default=0,
        metadata=_help(
            "Linear warmup steps (>= 0); overrides `warmup_ratio` when > 0.", group="optimisation"
        ),
    )
    per_device_batch_size: int = field(
        default=4, metadata=_help("Rows per device per micro-batch (>= 1).", group="optimisation")
    )
    gradient_accumulation_steps: int = field(
        default=1,
        metadata=_help(
            "Micro-batches per optimizer step (>= 1). The loss is normalised by the response "
            "tokens of the whole accumulated (and all-device) batch.",
            group="optimisation",
        ),
    )
    max_steps: int = field(
        default=-1,
        metadata=_help(
            "Optimizer steps to run; -1 = run `num_epochs` epochs.", group="optimisation"
        ),
    )
    num_epochs: float = field(
        default=1.0, metadata=_help("Epochs when `max_steps` is -1 (> 0).", group="optimisation")
    )
    max_grad_norm: float = field(
        default=1.0,
        metadata=_help("Clip the gradient norm to this (0 = no clipping).", group="optimisation"),
    )
    precision: str = field(
        default="fp32",
        metadata=_help(
            "Mixed precision of the student's forward/backward (master weights stay fp32).",
            choices=PRECISIONS,
            group="optimisation",
        ),
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata=_help(
            "Recompute activations in the backward pass to save memory.", group="optimisation"
        ),
    )
    seed: int = field(
        default=0,
        metadata=_help("Seed of model init, data order and sampling.", group="optimisation"),
    )
    device: str = field(
        default="auto",
        metadata=_help(
            "`auto` uses CUDA when present, `cpu` forces the CPU.",
            choices=("auto", "cpu"),
            group="optimisation",
        ),
    )

    # --- output, logging, checkpoints ------------------------------------------------------
    output_dir: str = field(
        default="",
        metadata=_help(
            "Run directory: checkpoints (`checkpoint-N/`), logs and the final student (`final/`).",
            group="output",
        ),
    )
    resume: str = field(
        default="auto",
        metadata=_help(
            "`auto` resumes from the newest complete checkpoint in `output_dir` if any, `never` "
            "starts fresh (refused when checkpoints exist), or a checkpoint path.",
            group="output",
        ),
    )
    report_to: str = field(
        default="none",
        metadata=_help(
            "Where metrics go besides the console and `output_dir/history.jsonl`.",
            choices=REPORTERS,
            group="output",
        ),
    )
    logging_steps: int = field(
        default=10, metadata=_help("Log every this many optimizer steps (>= 1).", group="output")
    )
    save_steps: int = field(
        default=500,
        metadata=_help(
            "Checkpoint every this many optimizer steps (0 = only at the end).", group="output"
        ),
    )
    save_total_limit: int | None = field(
        default=2,
        metadata=_help("Keep at most this many checkpoints (null = all).", group="output"),
    )
    checkpoint_on_sigterm: bool = field(
        default=True,
        metadata=_help(
            "On SIGTERM (cluster preemption, `kill`), finish the current optimizer step, write a "
            "checkpoint and stop without `final/`; running the same command again resumes.",
            group="output",
        ),
    )
    nonfinite: str = field(
        default="stop",
        metadata=_help(
            "On NaN/inf in reference logits, the loss or the gradients: `stop` with a "
            "NonFiniteError naming the role and batch, or `skip` the batch/step (counted).",
            choices=("stop", "skip"),
            group="output",
        ),
    )
    grad_norm_spike: float = field(
        default=10.0,
        metadata=_help(
            "Log a warning when a step's gradient norm exceeds this multiple of the running "
            "median (0 = never).",
            group="output",
        ),
    )
    progress: bool = field(
        default=True,
        metadata=_help(
            "Show one progress bar per run (loss, KD loss, tokens/s, reference wait).",
            group="output",
        ),
    )
    verbose: bool = field(
        default=False,
        metadata=_help(
            "Bring back the libraries' own output (model loading and saving bars, info logs, "
            "one raw dict per log step); off, a run prints its bar and one summary line.",
            group="output",
        ),
    )
    push_to_hub: bool = field(
        default=False,
        metadata=_help(
            "Push checkpoints and the final student with its model card to the Hub "
            "(`TrainingArguments.push_to_hub`; needs `hub_model_id` and a login).",
            group="output",
        ),
    )
    hub_model_id: str | None = field(
        default=None,
        metadata=_help("Hub repository (`user/name`) for `push_to_hub`.", group="output"),
    )

    # --- evaluation during training --------------------------------------------------------
    eval_dataset: str | None = field(
        default=None,
        metadata=_help(
            "Dataset spec (as `dataset`) of the validation rows; null = no evaluation.",
            group="evaluation",
        ),
    )
    eval_split: str | None = field(
        default=None,
        metadata=_help(
            "Split of `eval_dataset`. Default: `validation` for mini specs, else the spec's "
            "training split.",
            group="evaluation",
        ),
    )
    eval_limit: int | None = field(
        default=None,
        metadata=_help("Use at most this many validation rows.", group="evaluation"),
    )
    eval_steps: int = field(
        default=0,
        metadata=_help(
            "Evaluate every this many optimizer steps (0 = only at the end when an eval "
            "dataset is set). Logs `eval_loss`, `eval_sft_loss`, `eval_kd_loss`.",
            group="evaluation",
        ),
    )
    eval_generate_samples: int = field(
        default=0,
        metadata=_help(
            "Also generate greedy replies for this many validation rows at each evaluation "
            "and log `eval_rouge1`, `eval_rougeL` (and `eval_exact_match` when rows carry an "
            "`answer`). 0 = off.",
            group="evaluation",
        ),
    )
    metric_for_best_model: str | None = field(
        default=None,
        metadata=_help(
            "Keep the checkpoint with the best value of this metric (`eval_loss`, `eval_kd_loss`, "
            "`eval_rouge1`, ...; lower is better for losses) and save it as `final/`. Needs "
            "`save_steps` a multiple of `eval_steps`.",
            group="evaluation",
        ),
    )

    # --- passed through to transformers ---------------------------------------------------
    training_args: dict[str, Any] = field(
        default_factory=dict,
        metadata=_help(
            "Any other `transformers.TrainingArguments` field (`optim`, `torch_compile`, "
            "`deepspeed`, `fsdp`, ...), passed through as given. Keys deltakd sets itself are "
            "refused with the deltakd key to use. Override one with `training_args.KEY=VALUE`.",
            group="trainer",
        ),
    )
    model_kwargs: dict[str, Any] = field(
        default_factory=dict,
        metadata=_help(
            "Keyword arguments for `from_pretrained` of every model deltakd loads "
            "(`attn_implementation`, `dtype` / `torch_dtype` of the student, `revision`, ...).",
            group="trainer",
        ),
    )

    def __post_init__(self) -> None:
        hints = field_types(TrainConfig)
        for f in dataclasses.fields(self):
            setattr(self, f.name, coerce(f.name, getattr(self, f.name), hints[f.name]))
        for f in dataclasses.fields(self):
            check_choices(f.name, getattr(self, f.name), f.metadata.get("choices"))
        if not self.student_raw and self._require_models:
            raise bad("student_raw", self.student_raw, "a model path or Hub name (required)")
        if not self.output_dir:
            raise bad(
                "output_dir", self.output_dir, "a directory path (required; e.g. output_dir=runs/x)"
            )
        in_range("alpha", self.alpha, -10.0, 10.0)
        in_range("lam", self.lam, 0.0, 1.0)
        in_range("beta", self.beta, 0.0, 1.0)
        in_range("on_policy_ratio", self.on_policy_ratio, 0.0, 1.0)
        positive("temperature", self.temperature)
        if self.delta_floor is not None and not self.delta_floor < 0:
            raise bad("delta_floor", self.delta_floor,
                      "a negative log-probability such as -8.0, or null (off)")  # fmt: skip
        positive("learning_rate", self.learning_rate)
        positive("adam_epsilon", self.adam_epsilon)
        positive("num_epochs", self.num_epochs)
        in_range("weight_decay", self.weight_decay, 0.0, math.inf)
        in_range("max_grad_norm", self.max_grad_norm, 0.0, math.inf)
        in_range("grad_norm_spike", self.grad_norm_spike, 0.0, math.inf)
        in_range("adam_beta1", self.adam_beta1, 0.0, 1.0, hi_open=True)
        in_range("adam_beta2", self.adam_beta2, 0.0, 1.0, hi_open=True)
        in_range("warmup_ratio", self.warmup_ratio, 0.0, 1.0, hi_open=True)
        if self.max_prompt_length is None:
            # Follows max_length (a prompt must leave room for the response it is asked for).
            self.max_prompt_length = max(1, self.max_length // 2)
        for name in (
            "max_length",
            "max_prompt_length",
            "max_new_tokens",
            "per_device_batch_size",
            "gradient_accumulation_steps",
            "logging_steps",
        ):
            if getattr(self, name) < 1:
                raise bad(name, getattr(self, name), "an integer >= 1")
        for name in ("warmup_steps", "save_steps"):
            if getattr(self, name) < 0:
                raise bad(name, getattr(self, name), "an integer >= 0")
        if self.max_steps == 0 or self.max_steps < -1:
            raise bad("max_steps", self.max_steps, "an integer >= 1, or -1 to run `num_epochs`")
        for name in ("limit", "chunk_size", "save_total_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise bad(name, value, "an integer >= 1, or null")
        for name in ("eval_limit",):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise bad(name, getattr(self, name), "an integer >= 1, or null")
        for name in ("eval_steps", "eval_generate_samples"):
            if getattr(self, name) < 0:
                raise bad(name, getattr(self, name), "an integer >= 0")
        if self.metric_for_best_model is not None:
            if not self.eval_dataset and self._require_models:
                raise bad("metric_for_best_model", self.metric_for_best_model,
                          "null, or set eval_dataset too (the metric comes from evaluation)")  # fmt: skip
            if self.eval_steps < 1 or self.save_steps < 1 or self.save_steps % self.eval_steps:
                raise bad("metric_for_best_model", self.metric_for_best_model,
                          "null, or set eval_steps >= 1 and save_steps a multiple of it (the "
                          f"best model is chosen among saved checkpoints; now eval_steps="
                          f"{self.eval_steps}, save_steps={self.save_steps})")  # fmt: skip
        if self.push_to_hub and not self.hub_model_id:
            raise bad("hub_model_id", None, "a Hub repository `user/name` when push_to_hub is true")
        from deltakd.config.passthrough import check_model_kwargs, check_training_args

        self.training_args = check_training_args(self.training_args)
        self.model_kwargs = check_model_kwargs(self.model_kwargs)
        if self.max_prompt_length >= self.max_length:
            raise bad(
                "max_prompt_length",
                self.max_prompt_length,
                f"an integer below max_length ({self.max_length})",
            )
        # Method-specific checks (e.g. parallelogram's `variant`) live with the method.
        from deltakd.train.methods import get_method  # the registry: see the module docstring

        if self._require_models:  # DeltaKDConfig: the trainer validates once models are known
            get_method(self.method).validate(self)
        if self._require_models and self.references == "local" and self.method_needs_roles():
            for role in self.method_needs_roles():
                if not getattr(self, role):
                    raise bad(
                        role,
                        None,
                        f"a model path: method {self.method!r} needs the "
                        f"{role} reference (set {role}=PATH)",
                    )

    # -- helpers ------------------------------------------------------------------------------
    @property
    def student_init(self) -> str:
        """Where the trainable student is loaded from."""
        return self.student or self.student_raw

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.student_init

    def method_needs_roles(self) -> tuple[str, ...]:
        """Frozen roles the configured method needs from the reference source."""
        from deltakd.train.methods import get_method

        return get_method(self.method).reference_roles(self)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (sections as the mappings the user wrote), for saving as YAML."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if hasattr(value, "to_dict") else value
        return out

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]
