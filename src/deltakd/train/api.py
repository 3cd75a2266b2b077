"""`train(config) -> TrainResult`: the Python entry point behind `deltakd train`.

Steps: resume check → `DeltaKDTrainer(args=config)` (tokenizer and vocabulary check, rows,
method's `prepare_rows`, encoding, student (LoRA when `peft:`), reference source) → train →
final student in `output_dir/final` (`save_pretrained` + tokenizer + model card `README.md`),
`history.jsonl`, `data_stats.json` and the resolved `config.yaml` next to it.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from deltakd.config import TrainConfig, save_config
from deltakd.errors import ConfigError
from deltakd.loading import load_model
from deltakd.references.base import ReferenceSource
from deltakd.references.factory import SOURCE_FACTORIES, build_reference_source
from deltakd.train.notebook import DeltaKDTrainer, training_arguments
from deltakd.train.trainer import SigtermCheckpoint

__all__ = ["SOURCE_FACTORIES", "DeltaKDTrainer", "TrainResult", "build_reference_source",
           "train", "training_arguments"]  # fmt: skip

logger = logging.getLogger("deltakd.train")


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
        if (Path(checkpoint) / "adapter_config.json").is_file():  # a LoRA run's checkpoint
            from peft import AutoPeftModelForCausalLM

            student = AutoPeftModelForCausalLM.from_pretrained(checkpoint)
            if config.peft.get("merge", False):
                student = student.merge_and_unload()
        else:
            student = load_model(checkpoint, trust_remote_code=config.trust_remote_code)
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


def train(
    config: TrainConfig,
    *,
    references: ReferenceSource | None = None,
    callbacks: list[Any] | None = None,
) -> TrainResult:
    """Run one distillation as configured. `references` overrides the configured source."""
    from deltakd.loading import load_tokenizer
    from deltakd.train.console import quiet_libraries

    quiet_libraries(config.verbose)
    out = Path(config.output_dir)
    resume = _resume_path(config)
    if resume is not None and _finished(resume, config):
        # The HF Trainer would run one more step when resumed at its last step; a finished run
        # only needs its student saved (again).
        tokenizer = load_tokenizer(config.tokenizer_path,
                                   trust_remote_code=config.trust_remote_code)  # fmt: skip
        return _result_of_finished_run(config, resume, tokenizer)

    # The notebook trainer, built from the config's paths: both entry points make one object.
    trainer = DeltaKDTrainer(args=config, references=references)
    stats = trainer.data_stats
    out.mkdir(parents=True, exist_ok=True)
    if trainer.args.process_index == 0:
        save_config(config, out / "config.yaml")
        (out / "data_stats.json").write_text(json.dumps(dataclasses.asdict(stats), indent=1))
    for cb in [_HistoryCallback(out, config.report_to == "csv"), *(callbacks or [])]:
        trainer.add_callback(cb)
    sigterm = None
    if config.checkpoint_on_sigterm:
        sigterm = SigtermCheckpoint(trainer)
        trainer.add_callback(sigterm)
    try:
        output = trainer.train(resume_from_checkpoint=resume)
        stopped = sigterm is not None and sigterm.stopped_at is not None
        if trainer.eval_dataset is not None and config.eval_steps == 0 and not stopped:
            # eval_steps: 0 evaluates once, at the end (logged, and in the model card)
            output.metrics.update(trainer.evaluate())
    finally:
        trainer.close()
    metrics = dict(output.metrics)
    metrics.update(
        skipped_batches=trainer.skipped_batches,
        skipped_steps=trainer.skipped_steps,
        grad_norm_spikes=trainer.grad_norm_spikes,
    )
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
    trainer.save_student(tmp)
    if trainer.args.should_save:
        if result.final_dir.exists():
            shutil.rmtree(result.final_dir)
        os.replace(tmp, result.final_dir)
        if config.push_to_hub:
            # the Trainer pushed checkpoints; the final student and its card go up as well
            from huggingface_hub import upload_folder

            upload_folder(repo_id=config.hub_model_id, folder_path=result.final_dir,
                          commit_message=f"deltakd {config.method}: final student")  # fmt: skip
    trainer.accelerator.wait_for_everyone()
    return result
