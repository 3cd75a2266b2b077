"""The training config: one typed schema, loaded from YAML, overridable with `key=value`.

Every field carries its help text, its allowed values and its default in `metadata`, so the
same schema validates user input, prints `--help`-like errors and generates the config
reference in docs/USAGE.md (`config_reference_markdown`), which therefore cannot drift.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from deltakd.errors import ConfigError

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


def _help(
    text: str,
    *,
    choices: Sequence[str] | Callable[[], Sequence[str]] | None = None,
    group: str = "",
) -> dict[str, Any]:
    meta: dict[str, Any] = {"help": text, "group": group}
    if choices is not None:
        meta["choices"] = choices
    return meta


@dataclass
class TrainConfig:
    """Everything one `deltakd train` run needs. See docs/USAGE.md for the generated reference."""

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
    max_prompt_length: int = field(
        default=512,
        metadata=_help(
            "Maximum prompt tokens for methods that generate (seqkd, minillm, on-policy).",
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
    divergence: str = field(
        default="fkl",
        metadata=_help(
            "Divergence D(target, student) of DESIGN.md §1.",
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
    servers: dict[str, Any] = field(
        default_factory=dict,
        metadata=_help(
            "Settings for `references: servers` (docs/USAGE.md, 'Teacher servers').",
            group="references",
        ),
    )
    cache: dict[str, Any] = field(
        default_factory=dict,
        metadata=_help(
            "Settings for `references: cache` (docs/USAGE.md, 'Offline target cache').",
            group="references",
        ),
    )
    reference_dtype: str = field(
        default="auto",
        metadata=_help(
            "dtype of the local frozen models: `auto` follows `precision` (bf16/fp16 runs load "
            "references in that dtype, fp32 runs in fp32).",
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
        default=True, metadata=_help("Show a tqdm progress bar.", group="output")
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), _field_type(f.name)))
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices is not None and value is not None:
                allowed = tuple(choices() if callable(choices) else choices)
                if value not in allowed:
                    raise _bad(f.name, value, f"one of {', '.join(allowed)}")
        if not self.student_raw:
            raise _bad("student_raw", self.student_raw, "a model path or Hub name (required)")
        if not self.output_dir:
            raise _bad(
                "output_dir", self.output_dir, "a directory path (required; e.g. output_dir=runs/x)"
            )
        _in_range("alpha", self.alpha, -10.0, 10.0)
        _in_range("lam", self.lam, 0.0, 1.0)
        _in_range("beta", self.beta, 0.0, 1.0)
        _in_range("on_policy_ratio", self.on_policy_ratio, 0.0, 1.0)
        _positive("temperature", self.temperature)
        _positive("learning_rate", self.learning_rate)
        _positive("adam_epsilon", self.adam_epsilon)
        _positive("num_epochs", self.num_epochs)
        _in_range("weight_decay", self.weight_decay, 0.0, math.inf)
        _in_range("max_grad_norm", self.max_grad_norm, 0.0, math.inf)
        _in_range("grad_norm_spike", self.grad_norm_spike, 0.0, math.inf)
        _in_range("adam_beta1", self.adam_beta1, 0.0, 1.0, hi_open=True)
        _in_range("adam_beta2", self.adam_beta2, 0.0, 1.0, hi_open=True)
        _in_range("warmup_ratio", self.warmup_ratio, 0.0, 1.0, hi_open=True)
        for name in (
            "max_length",
            "max_prompt_length",
            "max_new_tokens",
            "per_device_batch_size",
            "gradient_accumulation_steps",
            "logging_steps",
        ):
            if getattr(self, name) < 1:
                raise _bad(name, getattr(self, name), "an integer >= 1")
        for name in ("warmup_steps", "save_steps"):
            if getattr(self, name) < 0:
                raise _bad(name, getattr(self, name), "an integer >= 0")
        if self.max_steps == 0 or self.max_steps < -1:
            raise _bad("max_steps", self.max_steps, "an integer >= 1, or -1 to run `num_epochs`")
        for name in ("limit", "chunk_size", "save_total_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise _bad(name, value, "an integer >= 1, or null")
        if self.max_prompt_length >= self.max_length:
            raise _bad(
                "max_prompt_length",
                self.max_prompt_length,
                f"an integer below max_length ({self.max_length})",
            )
        # Method-specific checks (e.g. parallelogram's `variant`) live with the method.
        from deltakd.train.methods import get_method

        get_method(self.method).validate(self)
        if self.references == "local" and self.method_needs_roles():
            for role in self.method_needs_roles():
                if not getattr(self, role):
                    raise _bad(
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

    def role_paths(self) -> dict[str, str]:
        """Frozen roles with a configured path: role -> path."""
        roles = ("teacher_ft", "teacher_raw", "student_raw", "teacher_ft2")
        return {r: getattr(self, r) for r in roles if getattr(self, r)}

    def method_needs_roles(self) -> tuple[str, ...]:
        """Frozen roles the configured method needs from the reference source."""
        from deltakd.train.methods import get_method

        return get_method(self.method).reference_roles(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


# --- loading -------------------------------------------------------------------------------


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def _suggest(name: str) -> str:
    close = difflib.get_close_matches(name, field_names(), n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


def _bad(name: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"config field {name!r} = {value!r} is not allowed: expected {allowed}.")


def _in_range(name: str, value: float, lo: float, hi: float, *, hi_open: bool = False) -> None:
    ok = lo <= value < hi if hi_open else lo <= value <= hi
    if not ok or math.isnan(value):
        bracket = ")" if hi_open else "]"
        raise _bad(name, value, f"a number in [{lo:g}, {hi:g}{bracket}")


def _positive(name: str, value: float) -> None:
    if not value > 0 or math.isinf(value):
        raise _bad(name, value, "a finite number > 0")


@typing.no_type_check
def _field_type(name: str) -> Any:
    return typing.get_type_hints(TrainConfig)[name]


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Turn a YAML/CLI value into the field's type, or raise ConfigError naming the field."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(name, value, inner[0])
    if origin is Literal:
        if value not in args:
            raise _bad(name, value, f"one of {', '.join(map(str, args))}")
        return value
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise _bad(name, value, "a mapping of settings")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise _bad(name, value, "true or false")
    if tp is int:
        if isinstance(value, bool):
            raise _bad(name, value, "an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise _bad(name, value, "an integer")
    if tp is float:
        if isinstance(value, bool):
            raise _bad(name, value, "a number")
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            # PyYAML reads `1e-5` (no dot) as a string; accept it as the number it obviously is.
            try:
                return float(value)
            except ValueError:
                pass
        raise _bad(name, value, "a number")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise _bad(name, value, "a string")
    return value


def parse_scalar(raw: str, item: str) -> Any:
    """One command-line value as a YAML scalar (`0.5` a float, `fkl` a string, `` None)."""
    try:
        return yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({exc}); quote it.") from exc


def split_override(item: str) -> tuple[str, Any]:
    """`"method_args.k=3"` -> `("method_args.k", 3)`: the key as written, the value parsed."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(
            f"override {item!r} is not KEY=VALUE: write e.g. `max_steps=100` or "
            "`method_args.num_samples=4`."
        )
    return key.strip(), parse_scalar(raw, item)


def nest_overrides(flat: Mapping[str, Any]) -> dict[str, Any]:
    """`{"method_args.k": 3}` -> `{"method_args": {"k": 3}}` (dots address nested settings)."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        parts = key.split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(
                    f"override {key!r} conflicts with an earlier override of {part!r}."
                )
        node[parts[-1]] = value
    return out


def parse_overrides(overrides: Iterable[str]) -> dict[str, Any]:
    """`["lr=1e-4", "method_args.k=3"]` -> nested dict. Values are parsed as YAML scalars."""
    return nest_overrides(dict(split_override(item) for item in overrides))


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def config_from_dict(data: Mapping[str, Any], *, source: str = "config") -> TrainConfig:
    """Build and validate a TrainConfig; unknown keys are refused with a suggestion."""
    names = set(field_names())
    unknown = [k for k in data if k not in names]
    if unknown:
        key = unknown[0]
        raise ConfigError(
            f"{source}: unknown config key {key!r}.{_suggest(key)} "
            "See docs/USAGE.md (Config reference) for the fields."
        )
    dict_fields = {f.name for f in dataclasses.fields(TrainConfig) if "dict" in str(f.type)}
    for key, value in data.items():
        if isinstance(value, Mapping) and key not in dict_fields:
            raise _bad(key, dict(value), "a single value, not a mapping")
    return TrainConfig(**dict(data))


def load_config(
    path: str | Path | None, overrides: Iterable[str] | Mapping[str, Any] = ()
) -> TrainConfig:
    """Load a YAML config file (or none) and apply `key=value` overrides (or a mapping)."""
    data: dict[str, Any] = {}
    source = "overrides"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(
                f"config file {p} does not exist: pass the path of a YAML config "
                "(e.g. configs/mini/delta_kd.yaml)."
            )
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"config file {p} is not valid UTF-8 YAML: {exc}. Fix the file."
            ) from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, Mapping):
            raise ConfigError(
                f"config file {p} must hold a mapping of `key: value` lines, "
                f"found {type(loaded).__name__}."
            )
        data = dict(loaded)
    over = dict(overrides) if isinstance(overrides, Mapping) else parse_overrides(overrides)
    return config_from_dict(_merge(data, over), source=source)


def save_config(config: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")


# --- documentation -------------------------------------------------------------------------

_GROUP_TITLES = {
    "models": "Models",
    "data": "Data",
    "method": "Method",
    "references": "References",
    "optimisation": "Optimisation",
    "output": "Output, logging and checkpoints",
}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(inner) + (" or null" if type(None) in args else "")
    if origin is dict or tp is dict:
        return "mapping"
    return {bool: "bool", int: "int", float: "float", str: "string"}.get(tp, str(tp))


def config_reference_markdown() -> str:
    """The config reference as Markdown, generated from the schema (docs/USAGE.md embeds it)."""
    lines: list[str] = []
    hints = typing.get_type_hints(TrainConfig)
    current = None
    for f in dataclasses.fields(TrainConfig):
        group = f.metadata.get("group", "")
        if group != current:
            current = group
            lines += ["", f"### {_GROUP_TITLES.get(group, group)}", ""]
            lines += ["| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
        missing = f.default is dataclasses.MISSING
        default = f.default_factory() if missing else f.default  # type: ignore[misc]
        default_txt = (
            "required"
            if default == ""
            else f"`{yaml.safe_dump(default, default_flow_style=True).strip().removesuffix('...').strip()}`"
        )
        choices = f.metadata.get("choices")
        allowed = ""
        if choices is not None:
            allowed = ", ".join(f"`{c}`" for c in (choices() if callable(choices) else choices))
        help_txt = f.metadata["help"].replace("|", "\\|")
        lines.append(
            f"| `{f.name}` | {_type_name(hints[f.name])} | {default_txt} | {allowed} | {help_txt} |"
        )
    return "\n".join(lines).strip() + "\n"
