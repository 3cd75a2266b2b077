"""`DeltaKDTrainer`: the trainer a notebook builds from objects (or paths), every method.

    from deltakd import DeltaKDConfig, DeltaKDTrainer
    trainer = DeltaKDTrainer(model="mini:student_raw", teacher_ft="mini:teacher_ft",
                             teacher_raw="mini:teacher_raw",
                             args=DeltaKDConfig(output_dir="runs/nb", max_steps=20),
                             train_dataset=Dataset.from_list(rows))
    trainer.train()
    trainer.save_student("runs/nb/final")

`deltakd train` (`deltakd.train.api.train`) builds the same trainer from the config's paths,
so both paths make the same objects (a test checks the weights agree after N steps). The
class is a `DistillTrainer` (a `transformers.Trainer`): `train`, `evaluate`, `save_model`,
callbacks and `TrainingArguments` behave as in TRL's trainers.

What it adds to the config's paths: models may be objects (a `PreTrainedModel`; the student
may be a `peft.PeftModel`), datasets `datasets.Dataset`s (or lists of dicts) with `messages`
or `prompt`/`response` columns, the tokenizer an object, and `peft_config` a
`peft.LoraConfig`. LoRA students (docs/ARCHITECTURE.md §4 for the targets): when the run needs
`student_raw` and the student starts from it, its logits come from the student with its
adapters disabled (`AdapterDisabled`) instead of a third frozen model.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import inspect
import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from deltakd.config import DeltaKDConfig, TrainConfig
from deltakd.errors import ConfigError
from deltakd.loading import load_model, load_tokenizer, reference_dtype
from deltakd.references.base import ReferenceSource
from deltakd.train.trainer import DistillTrainer

__all__ = ["GENERATION_SCORER", "AdapterDisabled", "DeltaKDTrainer", "training_arguments"]

logger = logging.getLogger("deltakd.train")

_ROLES = ("student_raw", "teacher_ft", "teacher_raw", "teacher_ft2")

#: scores generated replies: `(predictions, references, answers) -> {"rouge1", ...}`; named as
#: a string because train/ never imports eval/ (docs/ARCHITECTURE.md §3)
GENERATION_SCORER = "deltakd.eval.during_training:generation_scores"


def training_arguments(config: TrainConfig) -> Any:
    """The `transformers.TrainingArguments` equivalent of a TrainConfig (`training_args` last)."""
    from transformers import TrainingArguments

    report = [] if config.report_to in ("none", "csv") else [config.report_to]
    if report:
        pkg = {"tensorboard": "tensorboard", "wandb": "wandb"}[config.report_to]
        if importlib.util.find_spec(pkg) is None and not (
            pkg == "tensorboard" and importlib.util.find_spec("tensorboardX")
        ):
            raise ConfigError(
                f"report_to={config.report_to} needs the {pkg!r} package: "
                f"`pip install {pkg}`, or use report_to=csv."
            )
    schedule = config.lr_scheduler
    warmup = config.warmup_steps if config.warmup_steps > 0 else config.warmup_ratio
    if schedule == "constant" and warmup:
        schedule = "constant_with_warmup"
    if config.group_by_length:
        sampling = "group_by_length"
    else:
        sampling = "random" if config.shuffle else "sequential"
    evaluating = bool(config.eval_dataset) or config.eval_steps > 0
    params = inspect.signature(TrainingArguments.__init__).parameters
    checkpointing_arg = (
        "activation_checkpointing"
        if "activation_checkpointing" in params
        else "gradient_checkpointing"
    )
    kwargs: dict[str, Any] = dict(
        output_dir=config.output_dir,
        per_device_train_batch_size=config.per_device_batch_size,
        per_device_eval_batch_size=config.per_device_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        adam_beta1=config.adam_beta1,
        adam_beta2=config.adam_beta2,
        adam_epsilon=config.adam_epsilon,
        # No `optim`: transformers' own default (the fused AdamW for torch >= 2.8, also on CPU)
        # is several times faster per step than the single-tensor "adamw_torch" this used to pin
        # (a 67M-parameter step on 2 cores: 0.20 s against 1.43 s). `training_args: {optim: ...}`
        # still chooses another.
        lr_scheduler_type=schedule,
        warmup_steps=warmup,
        max_steps=config.max_steps,
        num_train_epochs=config.num_epochs,
        max_grad_norm=config.max_grad_norm,
        bf16=config.precision == "bf16",
        fp16=config.precision == "fp16",
        # transformers 5.20 renamed gradient_checkpointing; vLLM 0.32 needs transformers < 5.20.
        **{checkpointing_arg: config.gradient_checkpointing},
        dataloader_pin_memory=False,
        seed=config.seed,
        data_seed=config.seed,
        train_sampling_strategy=sampling,
        report_to=report or "none",
        logging_steps=config.logging_steps,
        # The Trainer also checkpoints the last step under "steps": save_steps=0 keeps only that.
        save_strategy="steps",
        save_steps=config.save_steps if config.save_steps > 0 else 10**12,
        save_total_limit=config.save_total_limit,
        eval_strategy="steps" if evaluating and config.eval_steps > 0 else "no",
        eval_steps=config.eval_steps if config.eval_steps > 0 else None,
        metric_for_best_model=config.metric_for_best_model,
        load_best_model_at_end=config.metric_for_best_model is not None,
        push_to_hub=config.push_to_hub,
        hub_model_id=config.hub_model_id,
        remove_unused_columns=False,
        logging_nan_inf_filter=False,
        disable_tqdm=not config.progress,
        log_level="info" if config.verbose else "warning",
        use_cpu=config.device == "cpu",
        dataloader_num_workers=0,
        average_tokens_across_devices=False,
        ddp_find_unused_parameters=False,
    )
    kwargs.update(config.training_args)
    try:
        return TrainingArguments(**kwargs)
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            f"transformers refused the training arguments ({exc}); check `training_args` "
            f"({config.training_args or 'none set'}) and the keys named above."
        ) from exc


class AdapterDisabled(torch.nn.Module):
    """`student_raw` as the LoRA student with its adapters disabled: a no-grad forward of the
    model already in memory, in eval mode (as a frozen reference), instead of a third model.

    The student is held outside the module tree so the reference source's `eval()` /
    `requires_grad_(False)` on this wrapper never reach the trained adapters.
    """

    def __init__(self, peft_model: torch.nn.Module) -> None:
        super().__init__()
        self._student = [peft_model]

    def _run(self, fn: Callable[[], Any]) -> Any:
        model = self._student[0]
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), model.disable_adapter():
                return fn()
        finally:
            model.train(was_training)

    def forward(self, **kwargs: Any) -> Any:
        """Logits of the base model (the reference source's logits path)."""
        return self._run(lambda: self._student[0](**kwargs))

    def get_base_model(self) -> torch.nn.Module:
        """The transformers model under the adapters: `deltakd.heads.logit_head` reads its
        output layer (not adapted) for the fused loss."""
        return self._student[0].get_base_model()

    @property
    def base_model(self) -> Callable[..., Any]:
        """Last hidden states of the base model (the hidden-state path, `fused_loss`)."""
        inner = self._student[0].get_base_model().base_model
        return lambda **kwargs: self._run(lambda: inner(**kwargs))

    @property
    def config(self) -> Any:
        return self._student[0].config


def _name_of(model: Any, role: str) -> str:
    name = getattr(model, "name_or_path", None) or getattr(
        getattr(model, "config", None), "_name_or_path", None
    )
    return str(name) if name else f"<{role} object>"


def rows_from_dataset(data: Any, what: str, limit: int | None = None) -> list[dict[str, Any]]:
    """Chat rows from a `datasets.Dataset` / list of dicts (`messages` or `prompt`+`response`)."""
    from deltakd.data.specs import normalise_row

    if isinstance(data, str | Path):
        raise ConfigError(f"{what}: pass a datasets.Dataset or a list of rows, or set the config's "
                          "dataset spec (a string) instead.")  # fmt: skip
    if not isinstance(data, Iterable):
        raise ConfigError(f"{what}: expected a datasets.Dataset or a list of dict rows with "
                          f"`messages` or `prompt`/`response`, got {type(data).__name__}.")  # fmt: skip
    rows = []
    for n, row in enumerate(data, start=1):
        if limit is not None and n > limit:
            break
        rows.append(normalise_row(row, n, what))
    if not rows:
        raise ConfigError(f"{what} has no rows.")
    return rows


def _is_peft(model: Any) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


class DeltaKDTrainer(DistillTrainer):
    """Distillation (any method) from a notebook; see the module docstring.

    Args:
        model: the student: a `PreTrainedModel` (or `PeftModel`) or a path / Hub / `mini:` name.
            Default: the config's `student` / `student_raw`.
        args: a `DeltaKDConfig` (or `TrainConfig`).
        teacher_ft, teacher_raw, student_raw, teacher_ft2: the frozen roles the method needs,
            objects or paths (default: the config's). `student_raw` defaults to the student's
            starting point: its adapters disabled for a LoRA student, else a frozen copy of
            `model` when it is an object.
        train_dataset, eval_dataset: `datasets.Dataset`s or lists of rows; default: the
            config's `dataset` / `eval_dataset` specs.
        processing_class: the tokenizer (default: the config's `tokenizer`, else the student's).
        peft_config: a `peft.LoraConfig` (or the config's `peft:` section).
        references: a ready `ReferenceSource` instead of the configured one.
        callbacks: `TrainerCallback`s.
    """

    def __init__(
        self,
        model: Any = None,
        args: TrainConfig | None = None,
        *,
        teacher_ft: Any = None,
        teacher_raw: Any = None,
        student_raw: Any = None,
        teacher_ft2: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        peft_config: Any = None,
        references: ReferenceSource | None = None,
        callbacks: list[Any] | None = None,
    ) -> None:
        from transformers import set_seed

        from deltakd.data.specs import load_rows
        from deltakd.data.tokenize import ChatCollator, ChatDataset, encode_rows
        from deltakd.data.vocab import check_vocabulary
        from deltakd.train.console import install_console, quiet_libraries
        from deltakd.train.methods import get_method

        if args is None or not isinstance(args, TrainConfig):
            raise ConfigError(
                "DeltaKDTrainer needs args=DeltaKDConfig(output_dir=..., method=..., ...) "
                f"(got {type(args).__name__}); TrainingArguments fields go into DeltaKDConfig."
            )
        config = args
        quiet_libraries(config.verbose)
        set_seed(config.seed)
        given = {"student_raw": student_raw, "teacher_ft": teacher_ft,
                 "teacher_raw": teacher_raw, "teacher_ft2": teacher_ft2}  # fmt: skip
        objects: dict[str, torch.nn.Module] = {}
        paths: dict[str, Any] = {}
        for role, value in given.items():
            if isinstance(value, torch.nn.Module):
                objects[role] = value
                paths[role] = _name_of(value, role)
            elif value is not None:
                paths[role] = str(value)
        student_obj = model if isinstance(model, torch.nn.Module) else None
        if model is not None and student_obj is None:
            paths["student"] = str(model)
        if student_obj is not None:
            paths["student"] = _name_of(student_obj, "student")
        if not (paths.get("student_raw") or config.student_raw):
            # the student's starting point is its own base (the paper's setting)
            paths["student_raw"] = paths.get("student") or config.student or ""
        if paths.get("student") == paths.get("student_raw", config.student_raw):
            paths["student"] = None
        peft_given = peft_config is not None or (student_obj is not None and _is_peft(student_obj))
        config = config.replace(**paths) if paths else config
        if not config.student_raw:
            raise ConfigError("DeltaKDTrainer: no student: pass model=... (an object or a path) "
                              "or set student_raw in the config.")  # fmt: skip
        self.run_config = config
        method = get_method(config.method)
        method.validate(config)
        if config.eval_steps > 0 and eval_dataset is None and not config.eval_dataset:
            raise ConfigError(f"eval_steps={config.eval_steps} needs validation rows: pass "
                              "eval_dataset=... or set the config's eval_dataset.")  # fmt: skip

        tokenizer = processing_class
        if tokenizer is None:
            tokenizer = load_tokenizer(config.tokenizer_path,
                                       trust_remote_code=config.trust_remote_code)  # fmt: skip
        needs_refs = method.uses_kd and config.lam < 1.0
        roles = method.reference_roles(config) if needs_refs else ()
        use_peft = peft_given or config.peft.enabled
        share_base = (
            use_peft
            and config.peft.get("share_base", True)
            and "student_raw" in roles
            and "student_raw" not in objects
            and config.student is None
            and config.references == "local"
            and references is None
        )
        for role in roles:
            if role not in objects and not getattr(config, role) and references is None:
                raise ConfigError(f"method {config.method!r} needs the {role} model: pass "
                                  f"{role}=... (an object or a path).")  # fmt: skip
        # the roles loaded from paths (the student's own base is not loaded again)
        own_base = share_base or (student_obj is not None and student_raw is None)
        check_paths = {r: getattr(config, r) for r in roles if r not in objects
                       and getattr(config, r) and not (r == "student_raw" and own_base)}  # fmt: skip
        if student_obj is None:
            check_paths["student"] = config.student_init
        vocab = check_vocabulary(tokenizer, check_paths, trust_remote_code=config.trust_remote_code)

        # --- data
        if train_dataset is None:
            rows = load_rows(config.dataset, config.train_split, limit=config.limit)
            source = config.dataset
        else:
            rows = rows_from_dataset(train_dataset, "train_dataset", config.limit)
            source = "train_dataset"
        rows = method.prepare_rows(rows, {"config": config, "tokenizer": tokenizer})
        encoded, kept, stats = encode_rows(tokenizer, rows, max_length=config.max_length,
                                           truncation=config.truncation)  # fmt: skip
        logger.info("data %s: %s", source, stats.summary())
        if stats.truncated or stats.dropped_too_long:
            logger.warning("max_length=%d: %d rows truncated, %d dropped", config.max_length,
                           stats.truncated, stats.dropped_too_long)  # fmt: skip
        self.data_stats = stats
        eval_rows = None
        if eval_dataset is not None:
            eval_rows = rows_from_dataset(eval_dataset, "eval_dataset", config.eval_limit)
        elif config.eval_dataset:
            split = config.eval_split
            if split is None and config.eval_dataset.startswith("mini:"):
                split = "validation"
            eval_rows = load_rows(config.eval_dataset, split, limit=config.eval_limit)
        eval_data = None
        if eval_rows is not None:
            enc, idx, _ = encode_rows(tokenizer, eval_rows, max_length=config.max_length,
                                      truncation="truncate")  # fmt: skip
            eval_data = ChatDataset(enc, idx)

        # --- student
        if student_obj is not None:
            student = student_obj
        else:
            kwargs = dict(config.model_kwargs)
            # Master weights in fp32 unless model_kwargs says otherwise (the Trainer autocasts).
            dtype = kwargs.pop("dtype", "fp32")
            student = load_model(config.student_init, dtype=dtype, role="student_raw",
                                 trust_remote_code=config.trust_remote_code, **kwargs)  # fmt: skip
        student.config.use_cache = False
        # The saved student generates with the run's tokenizer: align its special ids up front
        # (the Trainer would otherwise do it with a warning on every run).
        for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
            value = getattr(tokenizer, name, None)
            if value is not None:
                setattr(student.config, name, value)
                if getattr(student, "generation_config", None) is not None:
                    setattr(student.generation_config, name, value)
        frozen_copy = None
        if (student_obj is not None and not _is_peft(student_obj) and "student_raw" in roles
                and "student_raw" not in objects and not share_base
                and given["student_raw"] is None and references is None):  # fmt: skip
            # student_raw defaults to the student as given: keep a frozen copy before training
            frozen_copy = copy.deepcopy(student_obj).eval().requires_grad_(False)
        if use_peft and not _is_peft(student):
            from peft import get_peft_model

            lora = peft_config if peft_config is not None else config.peft.lora_config()
            student = get_peft_model(student, lora)
        self.uses_adapters = _is_peft(student)
        self.shares_base = share_base and self.uses_adapters

        # --- references
        targs = training_arguments(config)
        own_source = False
        if references is None and roles:
            dtype = reference_dtype(config)
            if config.references == "local":
                from deltakd.references.local import LocalReferences

                kwargs = {k: v for k, v in config.model_kwargs.items() if k != "dtype"}
                models: dict[str, torch.nn.Module] = {}
                for role in roles:
                    if role in objects:
                        models[role] = objects[role].to(targs.device)
                    elif role == "student_raw" and self.shares_base:
                        models[role] = AdapterDisabled(student)
                    elif role == "student_raw" and frozen_copy is not None:
                        models[role] = frozen_copy.to(targs.device)
                    else:
                        models[role] = load_model(
                            getattr(config, role), dtype=dtype, device=targs.device, role=role,
                            trust_remote_code=config.trust_remote_code, frozen=True, **kwargs)  # fmt: skip
                references = LocalReferences(models=models, dtype=dtype, device=targs.device,
                                             hidden_states=config.fused_loss)  # fmt: skip
            else:
                if objects:
                    raise ConfigError(
                        f"references: {config.references} loads its models from paths: pass "
                        f"{', '.join(objects)} as paths, or use references: local."
                    )
                from deltakd.references.factory import build_reference_source

                references = build_reference_source(config, roles, targs.device, dtype)
            own_source = True
        self.owns_references = own_source

        super().__init__(
            model=student,
            args=targs,
            train_dataset=ChatDataset(encoded, kept),
            eval_dataset=eval_data,
            data_collator=ChatCollator(pad_token_id=tokenizer.pad_token_id),
            processing_class=tokenizer,
            callbacks=callbacks,
            config=config,
            method=method,
            references=references,
            vocab_size=vocab.vocab_size,
        )
        install_console(self, config.method, progress=config.progress, verbose=config.verbose)
        if eval_rows is not None and config.eval_generate_samples > 0:
            self.generation_eval = _generation_eval(
                tokenizer, eval_rows[: config.eval_generate_samples], config
            )

    # --- saving ------------------------------------------------------------------------------
    def save_student(self, directory: str | Path, *, merge: bool | None = None) -> Path:
        """Save the student (adapters, or merged with `merge` / `peft.merge`), the tokenizer
        and a model card (`README.md`) in `directory`."""
        from deltakd.train.card import write_model_card

        out = Path(directory)
        merge = bool(self.run_config.peft.get("merge", False)) if merge is None else merge
        model = self.accelerator.unwrap_model(self.model)
        adapter = self.uses_adapters and not merge
        if self.args.should_save:
            if self.uses_adapters and merge:
                # merge into a copy: the trainer's model keeps its adapters
                merged = copy.deepcopy(model).merge_and_unload()
                merged.save_pretrained(out)
            else:
                model.save_pretrained(out)
            self.processing_class.save_pretrained(out)
            write_model_card(out, self.run_config, self.state.log_history, self.state.global_step,
                             self.needed_roles, adapter=adapter)  # fmt: skip
        self.accelerator.wait_for_everyone()
        return out

    def close(self) -> None:
        """Close the reference source this trainer built (servers, shared memory)."""
        if self.owns_references and self.references is not None:
            self.references.close()


def _generation_eval(
    tokenizer: Any, rows: list[dict[str, Any]], config: TrainConfig
) -> Callable[[torch.nn.Module], Mapping[str, float]]:
    """Greedy replies to `rows`' prompts scored by `GENERATION_SCORER` (ROUGE, exact match)."""
    from deltakd.generation import GenerationSettings, generate

    prompts = [r["messages"][:-1] for r in rows]
    targets = [r["messages"][-1]["content"] for r in rows]
    answers = [r.get("answer") for r in rows]
    settings = GenerationSettings(max_new_tokens=config.max_new_tokens,
                                  batch_size=config.per_device_batch_size)  # fmt: skip
    module_name, _, fn_name = GENERATION_SCORER.partition(":")
    scorer = getattr(importlib.import_module(module_name), fn_name)

    def run(model: torch.nn.Module) -> Mapping[str, float]:
        texts = [g.text for g in generate(model, tokenizer, prompts, settings, progress=False)]
        return scorer(texts, targets, answers, config.eval_dataset)

    return run


__all__ += ["DeltaKDConfig", "rows_from_dataset"]
