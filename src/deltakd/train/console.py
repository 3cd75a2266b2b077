"""What a run prints: one progress bar, one summary line, and the libraries kept quiet.

The HF Trainer prints one raw Python dict per log step (its `PrinterCallback` without a bar,
`ProgressCallback.on_log` with one) and transformers / huggingface_hub draw "Loading weights"
and "Writing model shards" bars per model. `quiet_libraries(verbose=False)` turns the latter
off; `RunConsole` replaces the Trainer's printer: the bar (tqdm, the Trainer's own) shows the
latest loss, KD loss, tokens/s and reference wait as its postfix, and the end of a run prints
one summary line. `verbose: true` (`--verbose`) keeps the libraries' output as it was.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from typing import Any

from transformers.trainer_callback import PrinterCallback, ProgressCallback

__all__ = ["RunConsole", "install_console", "quiet_libraries", "summary_line"]


def quiet_libraries(verbose: bool) -> None:
    """Library bars and info logs off (`verbose=False`) or back to their defaults."""
    import huggingface_hub.utils as hub_utils
    import transformers.utils.logging as tf_logging

    if verbose:
        tf_logging.set_verbosity_info()
        tf_logging.enable_progress_bar()
        hub_utils.enable_progress_bars()
    else:
        tf_logging.set_verbosity_error()
        tf_logging.disable_progress_bar()
        hub_utils.disable_progress_bars()
    try:
        import datasets

        (datasets.enable_progress_bars if verbose else datasets.disable_progress_bars)()
    except ImportError:  # pragma: no cover - datasets is a dependency
        pass
    logging.getLogger("accelerate").setLevel(logging.INFO if verbose else logging.WARNING)
    if not verbose:
        # peft 0.21 asks transformers 5 a deprecated question on every LoRA model it wraps
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*",
                                category=FutureWarning)  # fmt: skip


def _fmt(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else str(value)


def summary_line(name: str, history: list[dict[str, Any]], seconds: float, steps: int) -> str:
    """`[train] delta_kd: 60 steps in 12 s; loss 2.31 → 0.87 (kd 0.80); 3.1k tok/s; ...`"""
    logs = [h for h in history if "loss" in h]
    parts = [f"[train] {name}: {steps} steps in {seconds:.0f} s"]
    if logs:
        first, last = logs[0], logs[-1]
        loss = f"loss {_fmt(first['loss'])} → {_fmt(last['loss'])}"
        if "kd_loss" in last:
            loss += f" (kd {_fmt(last['kd_loss'])})"
        parts.append(loss)
        rates = [h["tokens_per_s"] for h in logs if "tokens_per_s" in h]
        if rates:
            parts.append(f"{sum(rates) / len(rates) / 1000:.1f}k tok/s")
        wait = sum(h.get("ref_wait_s", 0.0) for h in logs)
        if wait:
            parts.append(f"reference wait {wait:.1f} s")
        pads = [h["pad_fraction"] for h in logs if "pad_fraction" in h]
        if pads:
            parts.append(f"padding {100 * sum(pads) / len(pads):.0f}%")
    evals = [h for h in history if "eval_loss" in h]
    if evals:
        e = evals[-1]
        scores = [f"eval_loss {_fmt(e['eval_loss'])}"]
        scores += [f"{k} {_fmt(e[k])}" for k in ("eval_rouge1", "eval_exact_match") if k in e]
        parts.append(", ".join(scores))
    return "; ".join(parts)


class RunConsole(ProgressCallback):
    """The Trainer's progress bar with the run's metrics as postfix instead of printed dicts,
    and one summary line at the end. `bar=False` keeps only the summary line."""

    def __init__(self, name: str, *, bar: bool = True) -> None:
        super().__init__()
        self.name = name
        self.bar = bar
        self._start = time.perf_counter()
        self._post: dict[str, str] = {}

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._start = time.perf_counter()
        if self.bar:
            super().on_train_begin(args, state, control, **kw)

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.bar:
            super().on_step_end(args, state, control, **kw)

    def on_prediction_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.bar:
            super().on_prediction_step(args, state, control, **kw)

    def on_evaluate(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.bar:
            super().on_evaluate(args, state, control, **kw)

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any
    ) -> None:
        if not state.is_world_process_zero or not logs or self.training_bar is None:
            return
        post = self._post
        for key, label in (("loss", "loss"), ("kd_loss", "kd"), ("eval_loss", "eval")):
            if key in logs:
                post[label] = _fmt(float(logs[key]))
        if "tokens_per_s" in logs:
            post["tok/s"] = f"{logs['tokens_per_s']:.0f}"
        if "ref_wait_s" in logs:
            post["wait"] = f"{logs['ref_wait_s']:.2f}s"
        if post:
            self.training_bar.set_postfix(post, refresh=False)

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.bar:
            super().on_train_end(args, state, control, **kw)
        if state.is_world_process_zero:
            seconds = time.perf_counter() - self._start
            print(summary_line(self.name, state.log_history, seconds, state.global_step),
                  flush=True)  # fmt: skip


def install_console(trainer: Any, name: str, *, progress: bool, verbose: bool) -> None:
    """Swap the Trainer's printer / progress callbacks for a `RunConsole` (not when verbose)."""
    if verbose:
        return
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(RunConsole(name, bar=progress))
