"""`train(config) -> TrainResult`: the Python entry point behind `deltakd train`.

Steps: tokenizer and vocabulary check → rows (`load_rows`) → method's `prepare_rows` →
chat-template encoding with assistant masks → student → reference source → `DistillTrainer`
→ final student in `output_dir/final` (`save_pretrained` + tokenizer), `history.jsonl`,
`data_stats.json` and the resolved `config.yaml` next to it.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib
import inspect
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from deltakd.errors import ConfigError
from deltakd.references.base import ReferenceSource
from deltakd.train.config import TrainConfig, save_config

logger = logging.getLogger("deltakd.train")

#: `references:` kind -> "module:function" building a ReferenceSource from
#: `(config, roles, device)`. `local` is built here; the others live with their helpers.
SOURCE_FACTORIES: dict[str, str] = {
    "servers": "deltakd.references.client:from_config",
    "cache": "deltakd.references.cache:from_config",
}


@dataclass
class TrainResult:
    """What a finished run produced."""

    output_dir: Path
    final_dir: Path  # loads with AutoModelForCausalLM / AutoTokenizer
    global_step: int
    metrics: dict[str, Any]  # train_runtime, train_loss, ... plus data and skip counts
    history: list[dict[str, Any]]  # Trainer log history (one dict per log / step)
    data_stats: dict[str, Any] = field(default_factory=dict)
    resumed_from: str | None = None
    #: stopped early by SIGTERM after checkpointing `global_step`; `final_dir` was not written
    interrupted: bool = False

    def losses(self, key: str = "loss") -> list[tuple[int, float]]:
        """[(step, value)] of one logged metric."""
        return [(h["step"], h[key]) for h in self.history if key in h]


class _HistoryCallback(TrainerCallback):
    """Appends every log to `history.jsonl` (and `metrics.csv` with report_to=csv).

    A resumed run first drops the lines logged after its checkpoint's step (the interrupted
    run got further than its last checkpoint), so each step appears once.
    """

    CSV_COLUMNS = (
        "step",
        "epoch",
        "loss",
        "sft_loss",
        "kd_loss",
        "grad_norm",
        "learning_rate",
        "tokens_per_s",
        "ref_wait_s",
        "skipped_batches",
        "grad_norm_spikes",
    )

    def __init__(self, output_dir: Path, csv_enabled: bool) -> None:
        self.output_dir = output_dir
        self.csv_enabled = csv_enabled

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if not state.is_world_process_zero:
            return
        self._truncate(self.output_dir / "history.jsonl", state.global_step, _jsonl_step)
        self._truncate(self.output_dir / "metrics.csv", state.global_step, _csv_step, header=1)

    @staticmethod
    def _truncate(path: Path, step: int, step_of: Any, header: int = 0) -> None:
        """Drop the lines of `path` past its first `header` whose step is after `step`."""
        if not path.is_file():
            return
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        keep = lines[:header] + [line for line in lines[header:] if step_of(line) <= step]
        if len(keep) != len(lines):
            tmp = path.with_name(f".tmp-{path.name}")
            tmp.write_text("".join(keep), encoding="utf-8")
            tmp.replace(path)

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any
    ) -> None:
        if not state.is_world_process_zero or not logs:
            return
        row = {"step": state.global_step, **logs}
        with open(self.output_dir / "history.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.csv_enabled and "loss" in logs:
            path = self.output_dir / "metrics.csv"
            new = not path.exists()
            with open(path, "a", newline="", encoding="utf-8") as fh:
                writer = csv.DictWriter(fh, fieldnames=self.CSV_COLUMNS, extrasaction="ignore")
                if new:
                    writer.writeheader()
                writer.writerow(row)


def _jsonl_step(line: str) -> float:
    try:
        return float(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 0.0  # a torn last line of a killed run: kept, as before


def _csv_step(line: str) -> float:
    try:
        return float(line.split(",", 1)[0])
    except ValueError:
        return 0.0


def build_reference_source(
    config: TrainConfig, roles: tuple[str, ...], device: torch.device, dtype: torch.dtype
) -> ReferenceSource:
    """The configured source of the frozen roles' outputs."""
    if config.references == "local":
        from deltakd.references.local import LocalReferences

        paths = {r: getattr(config, r) for r in roles}
        return LocalReferences(
            paths,
            dtype=dtype,
            device=device,
            trust_remote_code=config.trust_remote_code,
            hidden_states=config.fused_loss,
        )
    target = SOURCE_FACTORIES[config.references]
    module_name, _, fn_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ConfigError(
            f"references: {config.references} is not available in this install "
            f"({exc}); use references: local."
        ) from exc
    return getattr(module, fn_name)(config, roles, device)


def _reference_dtype(config: TrainConfig) -> torch.dtype:
    name = config.reference_dtype
    if name == "auto":
        name = config.precision
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _resume_path(config: TrainConfig) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    out = Path(config.output_dir)
    last = get_last_checkpoint(str(out)) if out.is_dir() else None
    if config.resume == "auto":
        return last
    if config.resume == "never":
        if last is not None:
            raise ConfigError(
                f"output_dir {out} already holds checkpoints ({last}) and "
                "resume=never: choose a new output_dir or set resume=auto."
            )
        return None
    if not (Path(config.resume) / "trainer_state.json").is_file():
        raise ConfigError(
            f"config field 'resume' = {config.resume!r} is not allowed: expected "
            "auto, never, or a checkpoint directory holding trainer_state.json."
        )
    return config.resume


def _finished(checkpoint: str, config: TrainConfig) -> bool:
    """Whether `checkpoint` already holds the run's last step."""
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))
    target = config.max_steps if config.max_steps > 0 else state.get("max_steps", 0)
    return target > 0 and state.get("global_step", 0) >= target


def _result_of_finished_run(config: TrainConfig, checkpoint: str, tokenizer: Any) -> TrainResult:
    out = Path(config.output_dir)
    stats_file = out / "data_stats.json"
    stats = json.loads(stats_file.read_text(encoding="utf-8")) if stats_file.is_file() else {}
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))
    is_main = int(os.environ.get("RANK", "0")) == 0
    final = out / "final"
    if is_main:
        from transformers import AutoModelForCausalLM

        student = AutoModelForCausalLM.from_pretrained(
            checkpoint, trust_remote_code=config.trust_remote_code
        )
        tmp = out / ".tmp-final"
        if tmp.exists():
            shutil.rmtree(tmp)
        student.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    history = list(state.get("log_history", []))
    summary = next((h for h in reversed(history) if "train_loss" in h), {})
    metrics = {k: v for k, v in summary.items() if k not in ("step", "epoch")}
    losses = [h["loss"] for h in history if "loss" in h]
    metrics.setdefault("train_loss", sum(losses) / len(losses) if losses else float("nan"))
    metrics.update(skipped_batches=0, skipped_steps=0, grad_norm_spikes=0)
    logger.info("%s already holds step %d: nothing to train", checkpoint, state["global_step"])
    return TrainResult(output_dir=out, final_dir=final, global_step=int(state["global_step"]),
                       metrics=metrics, history=history, data_stats=stats,
                       resumed_from=checkpoint)  # fmt: skip


def training_arguments(config: TrainConfig) -> Any:
    """The `transformers.TrainingArguments` equivalent of a TrainConfig."""
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
    # transformers 5.20 renamed gradient_checkpointing to activation_checkpointing; vLLM 0.32
    # needs transformers < 5.20, so both spellings are in use.
    params = inspect.signature(TrainingArguments.__init__).parameters
    ckpt = (
        "activation_checkpointing"
        if "activation_checkpointing" in params
        else "gradient_checkpointing"
    )
    return TrainingArguments(
        output_dir=config.output_dir,
        per_device_train_batch_size=config.per_device_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        adam_beta1=config.adam_beta1,
        adam_beta2=config.adam_beta2,
        adam_epsilon=config.adam_epsilon,
        optim="adamw_torch",
        lr_scheduler_type=schedule,
        warmup_steps=warmup,
        max_steps=config.max_steps,
        num_train_epochs=config.num_epochs,
        max_grad_norm=config.max_grad_norm,
        bf16=config.precision == "bf16",
        fp16=config.precision == "fp16",
        **{ckpt: config.gradient_checkpointing},
        dataloader_pin_memory=False,
        seed=config.seed,
        data_seed=config.seed,
        train_sampling_strategy="random" if config.shuffle else "sequential",
        report_to=report or "none",
        logging_steps=config.logging_steps,
        # The Trainer also checkpoints the last step under "steps": save_steps=0 keeps only that.
        save_strategy="steps",
        save_steps=config.save_steps if config.save_steps > 0 else 10**12,
        save_total_limit=config.save_total_limit,
        remove_unused_columns=False,
        logging_nan_inf_filter=False,
        disable_tqdm=not config.progress,
        use_cpu=config.device == "cpu",
        dataloader_num_workers=0,
        average_tokens_across_devices=False,
        ddp_find_unused_parameters=False,
    )


def train(
    config: TrainConfig,
    *,
    references: ReferenceSource | None = None,
    callbacks: list[Any] | None = None,
) -> TrainResult:
    """Run one distillation as configured. `references` overrides the configured source."""
    from transformers import AutoModelForCausalLM, set_seed

    from deltakd.data.specs import load_rows
    from deltakd.data.tokenize import ChatCollator, ChatDataset, encode_rows
    from deltakd.data.vocab import check_vocabulary, load_tokenizer, resolve_model_path
    from deltakd.train.methods import get_method
    from deltakd.train.trainer import DistillTrainer, SigtermCheckpoint

    set_seed(config.seed)
    out = Path(config.output_dir)
    resume = _resume_path(config)
    args = training_arguments(config)
    method = get_method(config.method)
    tokenizer = load_tokenizer(config.tokenizer_path, trust_remote_code=config.trust_remote_code)

    needs_refs = method.uses_kd and config.lam < 1.0
    roles = method.reference_roles(config) if needs_refs else ()
    check_paths = {r: getattr(config, r) for r in roles if getattr(config, r)}
    check_paths["student"] = config.student_init
    vocab = check_vocabulary(tokenizer, check_paths, trust_remote_code=config.trust_remote_code)

    if resume is not None and _finished(resume, config):
        # The HF Trainer would run one more step when resumed at its last step; a finished run
        # only needs its student saved (again).
        return _result_of_finished_run(config, resume, tokenizer)

    rows = load_rows(config.dataset, config.train_split, limit=config.limit)
    rows = method.prepare_rows(rows, {"config": config, "tokenizer": tokenizer})
    encoded, kept, stats = encode_rows(
        tokenizer, rows, max_length=config.max_length, truncation=config.truncation
    )
    logger.info("data %s: %s", config.dataset, stats.summary())
    if stats.truncated or stats.dropped_too_long:
        logger.warning(
            "max_length=%d: %d rows truncated, %d dropped",
            config.max_length,
            stats.truncated,
            stats.dropped_too_long,
        )
    dataset = ChatDataset(encoded, kept)

    try:
        student = AutoModelForCausalLM.from_pretrained(
            resolve_model_path(config.student_init),
            dtype=torch.float32,
            trust_remote_code=config.trust_remote_code,
        )
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot load the student from {config.student_init!r}: {exc}. Set "
            "`student_raw` (or `student`) to a model directory or Hub name."
        ) from exc
    student.config.use_cache = False
    # The saved student generates with the run's tokenizer: align its special ids up front
    # (the Trainer would otherwise do it with a warning on every run).
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            setattr(student.config, name, value)
            if student.generation_config is not None:
                setattr(student.generation_config, name, value)

    own_source = False
    if references is None and roles:
        references = build_reference_source(config, roles, args.device, _reference_dtype(config))
        own_source = True

    out.mkdir(parents=True, exist_ok=True)
    if args.process_index == 0:
        save_config(config, out / "config.yaml")
        (out / "data_stats.json").write_text(json.dumps(dataclasses.asdict(stats), indent=1))
    cbs = [_HistoryCallback(out, config.report_to == "csv"), *(callbacks or [])]
    trainer = DistillTrainer(
        model=student,
        args=args,
        train_dataset=dataset,
        data_collator=ChatCollator(pad_token_id=tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=cbs,
        config=config,
        method=method,
        references=references,
        vocab_size=vocab.vocab_size,
    )
    sigterm = None
    if config.checkpoint_on_sigterm:
        sigterm = SigtermCheckpoint(trainer)
        trainer.add_callback(sigterm)
    try:
        output = trainer.train(resume_from_checkpoint=resume)
    finally:
        if own_source and references is not None:
            references.close()
    metrics = dict(output.metrics)
    metrics.update(
        skipped_batches=trainer.skipped_batches,
        skipped_steps=trainer.skipped_steps,
        grad_norm_spikes=trainer.grad_norm_spikes,
    )
    stopped = sigterm is not None and sigterm.stopped_at is not None
    result = TrainResult(
        output_dir=out,
        final_dir=out / "final",
        global_step=output.global_step,
        metrics=metrics,
        history=list(trainer.state.log_history),
        data_stats=dataclasses.asdict(stats),
        resumed_from=resume,
        interrupted=stopped,
    )
    if stopped:
        return result
    tmp = out / ".tmp-final"
    if trainer.args.should_save and tmp.exists():
        shutil.rmtree(tmp)
    trainer.save_model(str(tmp))
    trainer.accelerator.wait_for_everyone()
    if trainer.args.should_save:
        if result.final_dir.exists():
            shutil.rmtree(result.final_dir)
        os.replace(tmp, result.final_dir)
    trainer.accelerator.wait_for_everyone()
    return result
