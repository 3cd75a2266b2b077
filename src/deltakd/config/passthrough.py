"""Settings passed through to transformers: `training_args:` (any `TrainingArguments` field)
and `model_kwargs:` (`from_pretrained` keyword arguments), and `DeltaKDConfig`, the config of
the Python trainer (the YAML keys plus any `TrainingArguments` field as a keyword).

deltakd sets some `TrainingArguments` fields itself from its own keys (the batch size from
`per_device_batch_size`, ...) or because its trainer needs them (`remove_unused_columns`);
passing those through would silently disagree with the deltakd key, so they are refused with
the key to use instead.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

from deltakd.config.fields import suggest
from deltakd.config.schema import TrainConfig, field_names
from deltakd.errors import ConfigError

#: TrainingArguments field -> the deltakd key that sets it
OWNED_TRAINING_ARGS: dict[str, str] = {
    "output_dir": "output_dir",
    "per_device_train_batch_size": "per_device_batch_size",
    "per_device_eval_batch_size": "per_device_batch_size",
    "gradient_accumulation_steps": "gradient_accumulation_steps",
    "learning_rate": "learning_rate",
    "weight_decay": "weight_decay",
    "adam_beta1": "adam_beta1",
    "adam_beta2": "adam_beta2",
    "adam_epsilon": "adam_epsilon",
    "lr_scheduler_type": "lr_scheduler",
    "warmup_steps": "warmup_steps (or warmup_ratio)",
    "max_steps": "max_steps",
    "num_train_epochs": "num_epochs",
    "max_grad_norm": "max_grad_norm",
    "bf16": "precision",
    "fp16": "precision",
    "activation_checkpointing": "gradient_checkpointing",
    "gradient_checkpointing": "gradient_checkpointing",
    "seed": "seed",
    "data_seed": "seed",
    "train_sampling_strategy": "shuffle / group_by_length",
    "group_by_length": "group_by_length",
    "report_to": "report_to",
    "logging_steps": "logging_steps",
    "save_steps": "save_steps",
    "save_strategy": "save_steps",
    "save_total_limit": "save_total_limit",
    "eval_steps": "eval_steps",
    "eval_strategy": "eval_steps",
    "metric_for_best_model": "metric_for_best_model",
    "load_best_model_at_end": "metric_for_best_model",
    "disable_tqdm": "progress",
    "log_level": "verbose",
    "use_cpu": "device",
    "push_to_hub": "push_to_hub",
    "hub_model_id": "hub_model_id",
    "resume_from_checkpoint": "resume",
    # needed by the trainer itself: rows carry `assistant_mask` / `row_index`, the loss does
    # its own token normalisation and non-finite handling
    "remove_unused_columns": "(none: deltakd's batches need their extra columns)",
    "average_tokens_across_devices": "(none: the loss normalises over all devices itself)",
    "logging_nan_inf_filter": "nonfinite",
}

#: `from_pretrained` keyword arguments deltakd sets itself
OWNED_MODEL_KWARGS: dict[str, str] = {
    "trust_remote_code": "trust_remote_code",
    "pretrained_model_name_or_path": "student_raw / teacher_ft / ...",
}


@functools.cache
def training_argument_names() -> tuple[str, ...]:
    from transformers import TrainingArguments

    return tuple(f.name for f in dataclasses.fields(TrainingArguments) if f.init)


def check_training_args(values: Mapping[str, Any]) -> dict[str, Any]:
    """`training_args` keys must be `TrainingArguments` fields that deltakd does not set."""
    out = dict(values)
    if not out:
        return out
    names = training_argument_names()
    for key in out:
        if key in OWNED_TRAINING_ARGS:
            raise ConfigError(
                f"training_args.{key} is set by deltakd: use the deltakd key "
                f"{OWNED_TRAINING_ARGS[key]!r} instead (docs/USAGE.md, Config reference)."
            )
        if key not in names:
            raise ConfigError(
                f"training_args.{key} is not a transformers.TrainingArguments field."
                f"{suggest(key, names, prefix='training_args.')} See "
                "https://huggingface.co/docs/transformers/main_classes/trainer#transformers.TrainingArguments."
            )
    return out


def check_model_kwargs(values: Mapping[str, Any]) -> dict[str, Any]:
    """`model_kwargs`: `torch_dtype` is spelled `dtype` (transformers 5); dtype names checked."""
    out = dict(values)
    if "torch_dtype" in out:
        if "dtype" in out:
            raise ConfigError("model_kwargs sets both dtype and torch_dtype: keep one (dtype).")
        out["dtype"] = out.pop("torch_dtype")
    for key in out:
        if key in OWNED_MODEL_KWARGS:
            raise ConfigError(
                f"model_kwargs.{key} is set by deltakd: use the deltakd key "
                f"{OWNED_MODEL_KWARGS[key]!r} instead."
            )
    dtype = out.get("dtype")
    allowed = ("auto", "fp32", "bf16", "fp16", "float32", "bfloat16", "float16")
    if dtype is not None and dtype not in allowed:
        raise ConfigError(
            f"model_kwargs.dtype = {dtype!r} is not allowed: expected one of {', '.join(allowed)}."
        )
    return out


class DeltaKDConfig(TrainConfig):
    """The Python trainer's config: every YAML key of `TrainConfig`, plus any
    `transformers.TrainingArguments` field as a keyword (collected into `training_args`).

        DeltaKDConfig(output_dir="runs/x", method="delta_kd", max_steps=20, optim="adafactor")

    Model paths are optional here: `DeltaKDTrainer` takes the models as objects or paths and
    fills them in.
    """

    _require_models = False

    def __init__(self, **kwargs: Any) -> None:
        own = set(field_names())
        extra = {k: kwargs.pop(k) for k in list(kwargs) if k not in own}
        if extra:
            names = training_argument_names()
            for key in extra:
                if key not in names and key not in OWNED_TRAINING_ARGS:
                    hint = suggest(key, [*own, *names])
                    raise ConfigError(
                        f"DeltaKDConfig: unknown argument {key!r}: neither a deltakd config key "
                        f"nor a transformers.TrainingArguments field.{hint}"
                    )
            kwargs["training_args"] = {**dict(kwargs.get("training_args") or {}), **extra}
        super().__init__(**kwargs)
