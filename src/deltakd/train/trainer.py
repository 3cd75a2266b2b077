"""`DistillTrainer`: a `transformers.Trainer` whose loss is λ·SFT + (1−λ)·KD.

Shape of the design (as TRL's GKDTrainer): the HF Trainer owns the loop, accelerate (DDP /
FSDP / DeepSpeed), mixed precision, the optimizer and schedule, checkpoints with exact resume
(optimizer, scheduler, RNG, data position) and the progress bar. This class adds:

- `get_batch_samples`: the accumulated micro-batches of one optimizer step are drawn, tagged
  with a key and handed to the reference source's `prefetch` (and, where the method allows,
  the next step's micro-batches too, so servers work while the student trains); it also counts
  the response tokens of the whole accumulated batch over all processes, the normaliser of the
  loss (`num_items_in_batch`).
- `compute_loss`: fetches the references, runs the student, slices every role's logits to the
  shared vocabulary, checks them for NaN/inf, and asks the method for its loss terms.
- atomic checkpoints: each `checkpoint-N` is written to `.tmp-checkpoint-N` and renamed, so a
  kill during a save leaves the previous checkpoint intact and never a half-written one under
  a name `resume` would pick.
- logging of sft_loss, kd_loss, grad_norm, tokens/s, reference wait time, skipped batches and
  gradient-norm spikes.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import statistics
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from deltakd.config import TrainConfig
from deltakd.errors import NonFiniteError
from deltakd.heads import logit_head
from deltakd.references.base import ReferenceSource
from deltakd.references.role_logits import RoleLogits
from deltakd.train.methods import LossTerms, Method, StudentBatch

__all__ = ["REF_KEY", "DistillTrainer", "RoleLogits", "SigtermCheckpoint"]

logger = logging.getLogger("deltakd.train")

#: key of the int that ties a micro-batch to its prefetched references
REF_KEY = "_ref_key"


class DistillTrainer(Trainer):
    """HF Trainer with a distillation loss from a pluggable `Method` (see module docstring)."""

    # compute_loss divides by the response tokens of the whole accumulated batch itself.
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        *args: Any,
        config: TrainConfig,
        method: Method,
        references: ReferenceSource | None,
        vocab_size: int,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.config = config
        self.method = method
        self.references = references
        self.vocab_size = vocab_size
        self.needed_roles = method.reference_roles(config) if self._uses_references() else ()
        self._next_key = 0
        self._lookahead: tuple[Any, list[dict[str, Any]]] | None = None
        self._reset_metrics()
        self._last_log_time = time.perf_counter()
        self._grad_norms: deque[float] = deque(maxlen=50)
        self.skipped_batches = 0
        self.skipped_steps = 0
        self.grad_norm_spikes = 0
        #: `(model) -> {"rouge1": ..}` run at each evaluation (generation-based scores); set by
        #: `DeltaKDTrainer` from `eval_generate_samples`
        self.generation_eval: Any = None
        if config.fused_loss and self._uses_references():
            # Refuse a student whose logits the fused loss cannot reproduce before any step.
            logit_head(self.accelerator.unwrap_model(self.model))

    def _uses_references(self) -> bool:
        return self.method.uses_kd and self.config.lam < 1.0

    def _reset_metrics(self) -> None:
        self._m = {
            "sft": 0.0,
            "kd": 0.0,
            "resp_tokens": 0.0,
            "tokens": 0.0,
            "wait": 0.0,
            "skipped": 0.0,
            "micro_batches": 0.0,
            "slots": 0.0,
        }

    # --- data: draw, tag, prefetch, count -----------------------------------------------------
    def _pull(self, epoch_iterator: Any, num_batches: int) -> list[dict[str, Any]]:
        batches = []
        for _ in range(num_batches):
            try:
                batch = next(epoch_iterator)
            except StopIteration:
                break
            batch = self.method.prepare_batch(self, self.model, batch)
            batch[REF_KEY] = self._next_key
            self._next_key += 1
            if self.references is not None and self.needed_roles:
                self.references.prefetch(batch[REF_KEY], batch)
            batches.append(batch)
        return batches

    def get_batch_samples(
        self, epoch_iterator: Any, num_batches: int, device: torch.device
    ) -> tuple[list, torch.Tensor | int | None]:
        if self._lookahead is not None and self._lookahead[0] is epoch_iterator:
            batches = self._lookahead[1]
        else:
            batches = self._pull(epoch_iterator, num_batches)
        self._lookahead = None
        if (
            batches
            and self.method.prefetches_ahead(self.config)
            and self.references is not None
            and self.needed_roles
        ):
            # Draw the next optimizer step's micro-batches now so their references are computed
            # while this step trains. Data order is unchanged (same iterator, same sampler).
            self._lookahead = (epoch_iterator, self._pull(epoch_iterator, num_batches))
        count = sum(self.method.count_tokens(b) for b in batches) if batches else 0
        num_items = torch.as_tensor(count, dtype=torch.long, device=device)
        if self.args.world_size > 1:
            num_items = self.accelerator.gather(num_items.reshape(1)).sum()
        return batches, num_items

    # --- loss --------------------------------------------------------------------------------
    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        key = int(inputs.pop(REF_KEY, -1))
        refs = None
        if self.references is not None and self.needed_roles:
            ref = self.references.fetch(key, inputs)
            self._m["wait"] += float(ref.wait_seconds)
            refs = RoleLogits(
                ref, self.references.lm_heads(), self.vocab_size, inputs["input_ids"].device
            )
        fused = self.config.fused_loss and refs is not None
        if fused:
            # Only the last hidden states: the fused loss makes logits one chunk at a time.
            outputs = model(
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                use_cache=False,
                output_hidden_states=True,
                logits_to_keep=1,
            )
        else:
            outputs = model(
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                use_cache=False,
            )
        batch = StudentBatch(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            student_logits=None if fused else outputs.logits[:, :-1, : self.vocab_size],
            labels=inputs["input_ids"][:, 1:],
            mask=inputs["assistant_mask"][:, 1:].bool() & inputs["attention_mask"][:, 1:].bool(),
            inputs=inputs,
            student_hidden=outputs.hidden_states[-1][:, :-1] if fused else None,
        )
        skip_reason = None
        if refs is not None:
            skip_reason = self._check_refs(refs, batch, key)
        terms: LossTerms | None = None
        if skip_reason is None:
            if fused:
                assert refs is not None
                # The student's output layer as its forward computes it (deltakd.heads).
                head = logit_head(self.accelerator.unwrap_model(model))
                terms = self.method.fused_terms(batch, refs, self.config, head)
            else:
                terms = self.method.compute(batch, refs, self.config)
            if not torch.isfinite(terms.total.detach()).all():
                student = batch.student_logits if not fused else batch.student_hidden
                skip_reason = self._nonfinite(
                    f"the {self.method.name} loss is {terms.total.item()} (student outputs "
                    f"finite: {bool(torch.isfinite(student.detach()).all())})",
                    inputs,
                    key,
                )
        self._m["micro_batches"] += 1
        self._m["tokens"] += float(inputs["attention_mask"].sum())
        self._m["slots"] += float(inputs["attention_mask"].numel())
        if skip_reason is not None or terms is None:
            self._m["skipped"] += 1
            self.skipped_batches += 1
            # Zero loss through the student keeps every parameter in the graph (DDP needs that).
            if fused:  # the output layer is not in the graph of the hidden states
                head = self.accelerator.unwrap_model(model).get_output_embeddings().weight
                loss = batch.student_hidden.sum() * 0.0 + head.sum() * 0.0
            else:
                loss = batch.student_logits.sum() * 0.0
            return (loss, outputs) if return_outputs else loss
        n_counted = float(batch.mask.sum())
        self._m["resp_tokens"] += n_counted
        if terms.sft is not None:
            self._m["sft"] += float(terms.sft.detach())
        if terms.kd is not None:
            self._m["kd"] += float(terms.kd.detach())
        denom = num_items_in_batch if num_items_in_batch is not None else max(n_counted, 1.0)
        if torch.is_tensor(denom):
            denom = denom.clamp(min=1).to(terms.total.device)
        else:
            denom = max(float(denom), 1.0)
        # DDP averages gradients over processes; the normaliser already counts all of them.
        loss = terms.total / denom * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def _check_refs(self, refs: RoleLogits, batch: StudentBatch, key: int) -> str | None:
        mask = batch.mask
        if refs.target is not None:
            t = refs.target
            per_position = [t.logprobs, t.tail_mass]
            if t.tail_coeffs is not None:
                per_position.append(t.tail_coeffs)
            if not all(bool(torch.isfinite(x[mask]).all()) for x in per_position):
                return self._nonfinite(
                    "the cached sparse target contains NaN/inf", batch.inputs, key
                )
            return None
        for role in self.needed_roles:
            # Hidden states are checked as sent: making logits here would defeat fused_loss.
            if role in refs.ref.logits:
                x, what = refs.ref.logits[role][:, :-1, : self.vocab_size], "logits"
            elif role in refs.ref.hidden:
                x, what = refs.ref.hidden[role][:, :-1], "hidden states"
            else:
                continue
            # max/min propagate NaN and expose ±inf without a [B, T, V] temporary.
            finite = torch.isfinite(x.amax(dim=-1)) & torch.isfinite(x.amin(dim=-1))  # (B, T-1)
            bad = ~finite & mask.to(x.device)
            if bool(bad.any()):
                rows = batch.inputs.get("row_index")
                bad_rows = []
                if rows is not None:
                    bad_rows = sorted({int(rows[i]) for i in bad.any(dim=1).nonzero().flatten()})
                return self._nonfinite(
                    f"the {role} {what} contain NaN/inf at {int(bad.sum())} counted positions "
                    f"(dataset rows {bad_rows})",
                    batch.inputs,
                    key,
                )
        return None

    def _nonfinite(self, what: str, inputs: Mapping[str, Any], key: int) -> str:
        where = f"micro-batch {key} at optimizer step {self.state.global_step}"
        if self.config.nonfinite == "stop":
            raise NonFiniteError(
                f"{what} in {where}. Check the model / reference precision (try "
                "reference_dtype=fp32 or precision=fp32), or set nonfinite=skip to skip such "
                "batches."
            )
        logger.warning("skipping %s: %s", where, what)
        return what

    # --- evaluation ----------------------------------------------------------------------------
    def prediction_step(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor | None, None, None]:
        """The validation loss of one batch: the training loss (SFT and KD terms, summed into
        `_m` for `eval_sft_loss` / `eval_kd_loss`) on the dataset's responses, no gradients."""
        inputs = self._prepare_inputs(inputs)
        inputs[REF_KEY] = self._next_key
        self._next_key += 1
        if self.references is not None and self.needed_roles:
            self.references.prefetch(inputs[REF_KEY], inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach() / self.accelerator.num_processes, None, None

    def evaluation_loop(self, *args: Any, **kwargs: Any) -> Any:
        """HF's loop (mean `eval_loss` over batches) plus token-weighted `eval_sft_loss`,
        `eval_kd_loss` and, when configured, generation-based scores."""
        prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
        saved = self._m
        self._reset_metrics()
        try:
            output = super().evaluation_loop(*args, **kwargs)
            m = self._m
        finally:
            self._m = saved
        vals = torch.tensor([m["sft"], m["kd"], m["resp_tokens"]], dtype=torch.float64)
        if self.args.world_size > 1:
            vals = self.accelerator.reduce(vals.to(self.args.device), reduction="sum").cpu()
        sft, kd, resp = vals.tolist()
        if resp > 0:
            if self.method.uses_kd or sft:
                output.metrics[f"{prefix}_sft_loss"] = sft / resp
            if kd:
                output.metrics[f"{prefix}_kd_loss"] = kd / resp
        if self.generation_eval is not None:
            model = self.accelerator.unwrap_model(self.model)
            was_training = model.training
            model.eval()
            try:
                scores = self.generation_eval(model)
            finally:
                model.train(was_training)
            output.metrics.update({f"{prefix}_{k}": float(v) for k, v in scores.items()})
        return output

    # --- the run's summary ---------------------------------------------------------------------
    def _finalize_training(self, *args: Any, **kwargs: Any) -> Any:
        # The HF Trainer adds the loss accumulated since the last log to the summary
        # `train_loss` from this process alone, while the logged losses are means over the
        # processes; our per-process loss is scaled by the process count (see compute_loss),
        # so un-gathered it would be rank 0's share × world size. Average it first.
        if self.args.world_size > 1:
            self._tr_loss = self.accelerator.reduce(self._tr_loss.detach().clone(), "mean")
        return super()._finalize_training(*args, **kwargs)

    # --- gradients ---------------------------------------------------------------------------
    def _get_grad_norm(self, model: torch.nn.Module, grad_norm: Any = None) -> Any:
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        value = float(grad_norm)
        if not math.isfinite(value):
            if self.config.nonfinite == "stop":
                raise NonFiniteError(
                    f"the gradient norm is {value} at optimizer step {self.state.global_step}. "
                    "Lower the learning rate, check the data, or set nonfinite=skip to drop "
                    "such steps."
                )
            logger.warning(
                "skipping optimizer step %d: gradient norm is %s", self.state.global_step, value
            )
            model.zero_grad(set_to_none=True)  # AdamW leaves parameters without grads untouched
            self.skipped_steps += 1
            return grad_norm
        spike = self.config.grad_norm_spike
        if spike > 0 and len(self._grad_norms) >= 5:
            median = statistics.median(self._grad_norms)
            if median > 0 and value > spike * median:
                self.grad_norm_spikes += 1
                logger.warning(
                    "gradient-norm spike at step %d: %.4g > %g × running median %.4g",
                    self.state.global_step,
                    value,
                    spike,
                    median,
                )
        self._grad_norms.append(value)
        return grad_norm

    # --- logging -----------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            m = self._m
            vals = torch.tensor(
                [
                    m["sft"],
                    m["kd"],
                    m["resp_tokens"],
                    m["tokens"],
                    m["wait"],
                    m["skipped"],
                    m["micro_batches"],
                    m["slots"],
                ],
                dtype=torch.float64,
            )
            if self.args.world_size > 1:
                vals = self.accelerator.reduce(vals.to(self.args.device), reduction="sum").cpu()
            sft, kd, resp, tokens, wait, skipped, _micro, slots = vals.tolist()
            now = time.perf_counter()
            elapsed = max(now - self._last_log_time, 1e-9)
            self._last_log_time = now
            if resp > 0:
                if self.method.uses_kd or sft:
                    logs["sft_loss"] = sft / resp
                if kd:
                    logs["kd_loss"] = kd / resp
            logs["tokens_per_s"] = tokens / elapsed
            logs["ref_wait_s"] = wait / max(self.args.world_size, 1)
            if slots:
                logs["pad_fraction"] = 1.0 - tokens / slots
            if skipped:
                logs["skipped_batches"] = skipped
            if self.grad_norm_spikes:
                logs["grad_norm_spikes"] = self.grad_norm_spikes
            self._reset_metrics()
        super().log(logs, start_time)

    # --- checkpoints -------------------------------------------------------------------------
    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        """Write `checkpoint-N` atomically: into `.tmp-checkpoint-N`, then one rename."""
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

        self.store_flos()
        run_dir = self._get_output_dir(trial=trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        final = os.path.join(run_dir, name)
        tmp = os.path.join(run_dir, f".tmp-{name}")
        if self.args.should_save and os.path.exists(tmp):
            shutil.rmtree(tmp)
        self.accelerator.wait_for_everyone()
        self.save_model(tmp, _internal_call=True)
        if self.state.best_global_step:  # as the HF Trainer does (metric_for_best_model)
            best = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.best_global_step}")
            if self.state.best_global_step == self.state.global_step or os.path.isdir(best):
                self.state.best_model_checkpoint = best
        if not self.args.save_only_model:
            self._save_optimizer_and_scheduler(tmp)
            self._save_scaler(tmp)
            self._save_rng_state(tmp)
        if self.args.should_save:
            from transformers.trainer_callback import ExportableState

            for cb in [
                c
                for c in [*self.callback_handler.callbacks, self.control]
                if isinstance(c, ExportableState)
            ]:
                cb_name = cb.__class__.__name__
                if isinstance(self.state.stateful_callbacks.get(cb_name), list):
                    self.state.stateful_callbacks[cb_name].append(cb.state())
                else:
                    self.state.stateful_callbacks[cb_name] = cb.state()
            self.state.save_to_json(os.path.join(tmp, "trainer_state.json"))
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            _fsync_tree(tmp)
            if os.path.exists(final):  # a re-run of the same step: replace the old one
                old = os.path.join(run_dir, f".old-{name}")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
            _fsync_dir(run_dir)
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=False,
            )
        self.accelerator.wait_for_everyone()


class SigtermCheckpoint(TrainerCallback):
    """Turns SIGTERM into "finish this optimizer step, checkpoint, stop".

    The flag is agreed on by all processes at every step end (one tiny all-reduce), so ranks
    that did not receive the signal stop at the same step and the checkpoint's barriers match.
    """

    def __init__(self, trainer: DistillTrainer) -> None:
        self.trainer = trainer
        self.requested = False
        self.stopped_at: int | None = None
        self._previous: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        self.requested = True

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handler)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        flag = self.requested
        if args.world_size > 1:
            t = torch.tensor([float(flag)], device=args.device)
            flag = bool(self.trainer.accelerator.reduce(t, reduction="sum").item() > 0)
        if flag and not control.should_training_stop:
            logger.warning("SIGTERM: checkpointing step %d and stopping", state.global_step)
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def _fsync_tree(path: str) -> None:
    for root, _, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(root)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
