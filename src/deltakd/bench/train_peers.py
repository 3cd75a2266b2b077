"""`deltakd bench train [--peers]`: end-to-end training speed beside the trainers users would pick.

Two cases, each implementation in its own fresh Python process on the same models, rows,
batches (sequential order), optimizer settings and seed:

- **KD** (off-policy, forward KL to `teacher_ft`, λ = 0, τ = 1):
  ``trl_gkd``          TRL's `GKDTrainer` with `lmbda=0` (no student generations), `beta=0`
                       (in TRL's `generalized_jsd_loss`, β = 0 is `KL(teacher ‖ student)`, the
                       forward KL: `F.kl_div(student_log_probs, teacher_log_probs,
                       log_target=True)`), `seq_kd=False`;
  ``deltakd_kd``       `DeltaKDTrainer(method="kd", divergence="fkl")`, full logits;
  ``deltakd_kd_fused`` the same with `fused_loss=True` (the loss from hidden states, a chunk of
                       logits at a time).
- **Delta-KD** (three frozen references, z* = z_ft + α(z_sr − z_tr), α = 1, forward KL):
  ``naive_delta``      a plain `transformers.Trainer` whose `compute_loss` runs the three frozen
                       models, builds z* over the full [B, T, V] logits and takes the forward
                       KL over response tokens: the straightforward way to write it;
  ``deltakd_delta``    `DeltaKDTrainer(method="delta_kd")`, full logits;
  ``deltakd_delta_fused`` the same with `fused_loss=True`.

Every trainer gets the same tokenized rows: deltakd's own `encode_rows` output (the peers get
it as a `datasets.Dataset` with a collator that pads it into `input_ids`, `attention_mask` and
`labels` = −100 outside assistant tokens), so step 1 is the same computation everywhere and
its loss must agree (checked; the loss is the mean over response tokens in all of them).

Timing: wall time from the end of the last warm-up step to the end of the last step (a
`TrainerCallback`'s `on_step_end`: forward, backward, optimizer step, data loading); tokens
per second counts **all non-padding tokens** of those steps (response tokens are also
reported). Memory: peak resident set of the process during `train()` (the models, the
optimizer state made in step 1, activations), and its growth over the resident set just
before `train()`; on CUDA, peak allocated. No checkpoint is written by any implementation.

Worlds: `mini` (the shipped mini world: Qwen2 students/teachers with 1,024-token vocabulary)
and `real` (random Qwen2 models at Qwen2.5 shapes, `--layers` decoder layers: the student at
Qwen2.5-1.5B's width, the teachers at Qwen2.5-7B's width with their MLP shrunk to
`--teacher-intermediate` and their embeddings tied, for memory; the vocabulary is the
Qwen2.5 tokenizer's 151,665 tokens for every model, as TRL requires equal vocabularies and
deltakd slices the padded rows off, so all implementations compute over the same V; the
tokenizer is the rehearsal's Qwen2.5-sized one, trained on the mini world's text).
`--teacher-shape 1.5b` gives the teachers the student's width instead (Delta-KD at the 7B
width holds two 7B-wide teachers, the student, its copy and its optimizer state: ~11 GiB in fp32).
Rows: `--turns` consecutive mini:instruct rows joined into one multi-turn chat, cut at
`--max-length`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

KD_IMPLS: tuple[str, ...] = ("trl_gkd", "deltakd_kd", "deltakd_kd_fused")
DELTA_IMPLS: tuple[str, ...] = ("naive_delta", "deltakd_delta", "deltakd_delta_fused")
IMPLS: tuple[str, ...] = KD_IMPLS + DELTA_IMPLS
#: the implementations that need a peer package: impl -> (import name, how to install it)
PEER_PACKAGES: dict[str, tuple[str, str]] = {
    "trl_gkd": ("trl", "pip install 'deltakd[bench]' (or: pip install 'trl>=0.20,<2')"),
}
#: the implementations `bench train` runs without --peers
OWN_IMPLS: tuple[str, ...] = tuple(i for i in IMPLS if i.startswith("deltakd_"))
#: Qwen2.5's tokenizer: 151,643 regular + 22 added tokens
QWEN_TOKENS = 151_665
DEFAULTS = {
    "mini": {"batch": 8, "max_length": 256, "turns": 6, "steps": 6, "warmup": 2, "layers": 0},
    "real": {"batch": 2, "max_length": 256, "turns": 6, "steps": 3, "warmup": 1, "layers": 1},
}
#: step-1 losses must agree to this relative difference (fp32, different summation orders)
LOSS_RTOL = 1e-4


def missing_peers(impls: list[str] | tuple[str, ...]) -> dict[str, str]:
    """impl -> why it cannot run here (its peer package is not importable)."""
    out = {}
    for impl in impls:
        if impl in PEER_PACKAGES:
            module, how = PEER_PACKAGES[impl]
            if importlib.util.find_spec(module) is None:
                out[impl] = f"{impl}: the Python package {module!r} is not installed: {how}"
    return out


# --------------------------------------------------------------------------- the world


def _qwen_model(shape: dict[str, Any], *, layers: int, seed: int, **override: Any) -> Any:
    """A random Qwen2 causal LM from a published config (`deltakd.rehearse.shapes`), fp32."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    keep = {k: v for k, v in shape.items()
            if k not in ("architectures", "torch_dtype", "transformers_version")}  # fmt: skip
    config = Qwen2Config(**{**keep, "num_hidden_layers": layers, "vocab_size": QWEN_TOKENS,
                            "max_window_layers": layers, **override})  # fmt: skip
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).float()


def _models(args: argparse.Namespace, roles: tuple[str, ...]) -> dict[str, Any]:
    """role -> model (frozen roles in eval mode without gradients; `student` trainable). The
    student starts as `student_raw` (the same weights, a separate object)."""
    from deltakd.loading import load_model

    out = {}
    for role in roles:
        base = "student_raw" if role == "student" else role
        if args.world == "mini":
            model = load_model(f"mini:{base}", dtype="fp32")
        else:
            from deltakd.rehearse import shapes

            seed = {"teacher_ft": 1, "teacher_raw": 2, "student_raw": 3}[base]
            if base == "student_raw" or args.teacher_shape == "1.5b":
                model = _qwen_model(shapes.QWEN_1_5B, layers=args.layers, seed=seed)
            else:
                model = _qwen_model(shapes.QWEN_7B, layers=args.layers, seed=seed,
                                    intermediate_size=args.teacher_intermediate,
                                    tie_word_embeddings=True)  # fmt: skip
        if role != "student":
            model.eval().requires_grad_(False)
        out[role] = model
    return out


def _rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """`batch × steps` chats, each `turns` consecutive mini:instruct rows as one conversation."""
    from deltakd.data.specs import load_rows

    need = args.batch * args.steps * args.turns
    rows = load_rows("mini:instruct", "train", limit=need)
    chats = []
    for i in range(0, need, args.turns):
        messages = [m for row in rows[i : i + args.turns] for m in row["messages"]]
        chats.append({"messages": messages})
    return chats


def build_real_tokenizer(out_dir: Path) -> Path:
    """The rehearsal's Qwen2.5-sized tokenizer (151,665 tokens, the Qwen chat template), its BPE
    trained on the mini world's text."""
    from deltakd.data.specs import load_rows
    from deltakd.rehearse.world import build_tokenizer

    corpus = [m["content"] for r in load_rows("mini:instruct", "train", limit=2000)
              for m in r["messages"]]  # fmt: skip
    build_tokenizer(corpus, "qwen", out_dir, eos="<|im_end|>", trained_vocab=2000)
    return out_dir


# --------------------------------------------------------------------------- one worker


def _deltakd_config(args: argparse.Namespace, method: str, fused: bool, out: str) -> Any:
    from deltakd.config import DeltaKDConfig

    return DeltaKDConfig(
        output_dir=out, method=method, divergence="fkl", temperature=1.0, lam=0.0, alpha=1.0,
        max_length=args.max_length, per_device_batch_size=args.batch, max_steps=args.steps,
        learning_rate=1e-4, lr_scheduler="constant", warmup_steps=0, warmup_ratio=0.0,
        shuffle=False, fused_loss=fused, precision="fp32", reference_dtype="fp32",
        device="cpu" if args.device == "cpu" else "auto", references="local",
        logging_steps=1, save_steps=0, report_to="none", progress=False, seed=args.seed,
        truncation="truncate",
    )  # fmt: skip


def _checkpointing_key() -> str:
    import inspect

    from transformers import TrainingArguments

    params = inspect.signature(TrainingArguments.__init__).parameters
    return "activation_checkpointing" if "activation_checkpointing" in params else (
        "gradient_checkpointing")  # fmt: skip


def _hf_kwargs(cfg: Any) -> dict[str, Any]:
    """The `TrainingArguments` of the peers: the deltakd config's optimizer settings (and, like
    deltakd, transformers' default optimizer), schedule, batch and order, nothing saved."""
    return dict(
        output_dir=cfg.output_dir, per_device_train_batch_size=cfg.per_device_batch_size,
        gradient_accumulation_steps=1, max_steps=cfg.max_steps, learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay, adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2,
        adam_epsilon=cfg.adam_epsilon, max_grad_norm=cfg.max_grad_norm,
        lr_scheduler_type="constant", warmup_steps=0, seed=cfg.seed, data_seed=cfg.seed,
        train_sampling_strategy="sequential", logging_steps=1, save_strategy="no",
        report_to="none", use_cpu=cfg.device == "cpu", dataloader_num_workers=0,
        dataloader_pin_memory=False, disable_tqdm=True, remove_unused_columns=False,
        bf16=False, fp16=False, log_level="warning",
        # TRL's SFTConfig turns checkpointing on by default; transformers 5.20 renamed the key
        **{_checkpointing_key(): False},
    )  # fmt: skip


class _PadCollator:
    """deltakd's encoded rows → `input_ids`, `attention_mask`, `labels` (−100 outside assistant
    tokens): what a TRL or transformers trainer consumes."""

    def __init__(self, pad_token_id: int) -> None:
        from deltakd.data.tokenize import ChatCollator

        self.inner = ChatCollator(pad_token_id=pad_token_id)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner(features)
        return {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}


def _encoded_dataset(tokenizer: Any, rows: list[dict[str, Any]], cfg: Any) -> Any:
    """The rows as deltakd encodes them (same template, masks, truncation), as a Dataset."""
    import datasets

    from deltakd.data.tokenize import encode_rows

    enc, _, _ = encode_rows(tokenizer, rows, max_length=cfg.max_length,
                            truncation=cfg.truncation)  # fmt: skip
    return datasets.Dataset.from_dict({
        "input_ids": [list(enc[i].input_ids) for i in range(len(enc))],
        "assistant_mask": [[bool(x) for x in enc[i].assistant_mask] for i in range(len(enc))],
    })  # fmt: skip


def _naive_delta_trainer_class() -> type:
    """Delta-KD on a plain `transformers.Trainer`, written the straightforward way."""
    import torch
    from transformers import Trainer

    class NaiveDeltaTrainer(Trainer):
        def __init__(self, *a: Any, references: dict[str, Any], alpha: float, **kw: Any):
            super().__init__(*a, **kw)
            self.references = references
            self.alpha = alpha

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            ids, attn = inputs["input_ids"], inputs["attention_mask"]
            out = model(input_ids=ids, attention_mask=attn)
            with torch.no_grad():
                z = {
                    r: m(input_ids=ids, attention_mask=attn).logits
                    for r, m in self.references.items()
                }  # three (B, T, V)
                target = z["teacher_ft"] + self.alpha * (z["student_raw"] - z["teacher_raw"])
            mask = inputs["labels"][:, 1:] != -100  # (B, T-1)
            logp_t = torch.log_softmax(target[:, :-1], dim=-1)  # (B, T-1, V)
            logp_s = torch.log_softmax(out.logits[:, :-1], dim=-1)  # (B, T-1, V)
            kl = (logp_t.exp() * (logp_t - logp_s)).sum(-1)  # (B, T-1)
            loss = kl[mask].sum() / mask.sum().clamp_min(1)
            return (loss, out) if return_outputs else loss

    return NaiveDeltaTrainer


def _timed(cls: type, record: dict[str, list]) -> type:
    """`cls` with each training step's tokens and loss recorded."""

    class Timed(cls):  # type: ignore[misc,valid-type]
        def training_step(self, model, inputs, *a: Any, **kw: Any):
            record["tokens"].append(int(inputs["attention_mask"].sum()))
            record["response_tokens"].append(int((inputs["labels"][:, 1:] != -100).sum()))
            loss = super().training_step(model, inputs, *a, **kw)
            record["losses"].append(float(loss.detach()))
            return loss

    Timed.__name__ = f"Timed{cls.__name__}"
    return Timed


def _step_clock(record: dict[str, list]) -> Any:
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            record["step_end"].append(time.perf_counter())
            control.should_save = False  # no implementation writes checkpoints
            return control

    return StepClock()


def _worker(args: argparse.Namespace) -> int:
    import torch

    from deltakd.bench.loss import PeakRSS
    from deltakd.loading import load_tokenizer

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    torch.set_num_threads(args.threads)
    impl = args.worker
    delta = impl in DELTA_IMPLS
    roles = ("student", "teacher_ft") + (("teacher_raw", "student_raw") if delta else ())
    tokenizer = load_tokenizer(args.tokenizer)
    rows = _rows(args)
    models = _models(args, roles)
    record: dict[str, list] = {"tokens": [], "response_tokens": [], "losses": [], "step_end": []}
    out_dir = tempfile.mkdtemp(prefix=f"deltakd-bench-train-{impl}-")
    method = "delta_kd" if delta else "kd"
    cfg = _deltakd_config(args, method, impl.endswith("_fused"), out_dir)
    clock = _step_clock(record)
    if impl.startswith("deltakd_"):
        from deltakd.train.notebook import DeltaKDTrainer

        frozen = {r: models[r] for r in roles if r != "student"}
        trainer = _timed(DeltaKDTrainer, record)(
            model=models["student"], args=cfg, train_dataset=rows, processing_class=tokenizer,
            callbacks=[clock], **frozen)  # fmt: skip
    elif impl == "trl_gkd":
        try:
            from trl.experimental.gkd import GKDConfig, GKDTrainer  # TRL ≥ 0.26
        except ImportError:
            from trl import GKDConfig, GKDTrainer

        gkd = GKDConfig(**_hf_kwargs(cfg), lmbda=0.0, beta=0.0, seq_kd=False, temperature=1.0,
                        max_length=cfg.max_length)  # fmt: skip
        trainer = _timed(GKDTrainer, record)(
            model=models["student"], teacher_model=models["teacher_ft"], args=gkd,
            train_dataset=_encoded_dataset(tokenizer, rows, cfg), processing_class=tokenizer,
            data_collator=_PadCollator(tokenizer.pad_token_id), callbacks=[clock])  # fmt: skip
    elif impl == "naive_delta":
        from transformers import TrainingArguments

        refs = {r: models[r] for r in ("teacher_ft", "teacher_raw", "student_raw")}
        trainer = _timed(_naive_delta_trainer_class(), record)(
            model=models["student"], args=TrainingArguments(**_hf_kwargs(cfg)),
            train_dataset=_encoded_dataset(tokenizer, rows, cfg),
            data_collator=_PadCollator(tokenizer.pad_token_id), callbacks=[clock],
            references=refs, alpha=cfg.alpha)  # fmt: skip
    else:
        raise ValueError(impl)
    cuda = torch.cuda.is_available() and args.device != "cpu"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    probe = PeakRSS()
    start = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - start
    peak = probe.peak()
    ends, w = record["step_end"], args.warmup
    timed_tokens = sum(record["tokens"][w:])
    seconds = ends[-1] - ends[w - 1] if w > 0 else ends[-1] - start
    step_seconds = [b - a for a, b in zip([start, *ends[:-1]], ends, strict=True)]
    result = {
        "impl": impl,
        "steps": len(ends),
        "warmup": w,
        "seconds": seconds,
        "step_seconds": step_seconds,
        "train_seconds": total,
        "tokens": record["tokens"],
        "response_tokens": record["response_tokens"],
        "tokens_per_s": timed_tokens / seconds,
        "response_tokens_per_s": sum(record["response_tokens"][w:]) / seconds,
        "losses": record["losses"],
        "baseline_rss_bytes": probe.baseline,
        "peak_rss_bytes": peak,
        "peak_cuda_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "threads": torch.get_num_threads(),
        # what the trainer ran with (TRL's configs default both on)
        "checkpointing": bool(getattr(trainer.model, "is_gradient_checkpointing", False)),
        "bf16": bool(trainer.args.bf16),
        "vocab": int(models["student"].config.vocab_size),
        "params": {r: sum(p.numel() for p in m.parameters()) for r, m in models.items()},
    }
    if hasattr(trainer, "close"):
        trainer.close()
    import shutil

    shutil.rmtree(out_dir, ignore_errors=True)
    print(json.dumps(result), flush=True)
    return 0


# --------------------------------------------------------------------------- driver


def _fill_defaults(args: argparse.Namespace) -> None:
    for key, value in DEFAULTS[args.world].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.warmup >= args.steps:
        raise SystemExit(f"--warmup {args.warmup} must be below --steps {args.steps}")
    args.threads = args.threads or 1


def _worker_cmd(impl: str, args: argparse.Namespace) -> list[str]:
    cmd = [args.python or sys.executable, "-m", "deltakd.bench.train_peers", "--worker", impl,
           "--world", args.world, "--tokenizer", args.tokenizer, "--seed", str(args.seed),
           "--threads", str(args.threads), "--device", args.device]  # fmt: skip
    for key in ("batch", "max_length", "turns", "steps", "warmup", "layers",
                "teacher_intermediate", "teacher_shape"):  # fmt: skip
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    return cmd


def _run_worker(impl: str, args: argparse.Namespace) -> dict | str:
    env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1", "OMP_NUM_THREADS": str(args.threads)}
    src = str(Path(__file__).resolve().parents[2])  # this deltakd, whichever interpreter runs
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    proc = subprocess.run(_worker_cmd(impl, args), capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        why = "killed (out of memory?)" if proc.returncode < 0 else f"rc={proc.returncode}"
        tail = proc.stderr.strip().splitlines()[-4:]
        return f"{impl} worker failed ({why}): " + " | ".join(tail)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> int:
    args.world = getattr(args, "world", None) or "mini"
    _fill_defaults(args)
    args.device = getattr(args, "device", None) or "cpu"
    args.python = getattr(args, "python", None)
    wanted = [i.strip() for i in (args.impls or "").split(",") if i.strip()] or list(
        IMPLS if args.peers else OWN_IMPLS
    )
    bad = [i for i in wanted if i not in IMPLS]
    if bad:
        print(f"unknown implementation(s) {bad}; choose from {', '.join(IMPLS)}", file=sys.stderr)
        return 2
    missing = {}
    if args.python is None:
        missing = missing_peers(wanted)
    else:
        # the workers run in another interpreter: ask it which peers it has
        for impl, (module, how) in PEER_PACKAGES.items():
            if impl in wanted:
                probe = subprocess.run([args.python, "-c", f"import {module}"],
                                       capture_output=True)  # fmt: skip
                if probe.returncode != 0:
                    missing[impl] = (f"{impl}: the Python package {module!r} is not importable "
                                     f"by {args.python}: {how}")  # fmt: skip
    tmp = None
    if args.world == "real" and not args.tokenizer:
        tmp = tempfile.TemporaryDirectory(prefix="deltakd-bench-train-tok-")
        print("building the Qwen2.5-sized tokenizer (151,665 tokens) ...", flush=True)
        args.tokenizer = str(build_real_tokenizer(Path(tmp.name) / "tokenizer"))
    args.tokenizer = args.tokenizer or "mini:tokenizer"
    print(f"deltakd bench train{' --peers' if args.peers else ''}: world={args.world}"
          f"{f' layers={args.layers} teachers={args.teacher_shape}' if args.world == 'real' else ''}"
          f" batch={args.batch} "
          f"max_length={args.max_length} turns/row={args.turns} steps={args.steps} "
          f"(first {args.warmup} not timed) fp32 threads={args.threads} device={args.device}; "
          "each implementation in its own process", flush=True)  # fmt: skip
    for line in missing.values():
        print(f"skipped {line}", flush=True)
    results: dict[str, dict] = {}
    failed: dict[str, str] = {}
    try:
        for impl in wanted:
            if impl in missing:
                continue
            print(f"running {impl} ...", flush=True)
            r = _run_worker(impl, args)
            if isinstance(r, str):
                print(r, file=sys.stderr, flush=True)
                failed[impl] = r
            else:
                results[impl] = r
    finally:
        if tmp is not None:
            tmp.cleanup()
    agree = _table(results, args)
    if args.json:
        keys = ("tokens_per_s", "response_tokens_per_s", "seconds", "peak_rss_bytes",
                "baseline_rss_bytes", "peak_cuda_bytes", "losses", "tokens", "step_seconds",
                "vocab", "checkpointing", "bf16")  # fmt: skip
        summary: dict[str, Any] = {i: {k: r[k] for k in keys} for i, r in results.items()}
        summary["config"] = {k: getattr(args, k) for k in ("world", "batch", "max_length",
                                                              "turns", "steps", "warmup",
                                                              "layers", "threads", "seed",
                                                              "teacher_shape")}  # fmt: skip
        summary["skipped"] = missing
        summary["failed"] = failed
        summary["losses_agree"] = agree
        print(json.dumps(summary))
    return 1 if failed or not all(agree.values()) else 0


def _table(results: dict[str, dict], args: argparse.Namespace) -> dict[str, bool]:
    """Print each case's rows; returns case -> whether its step-1 losses agree."""
    agree = {}
    gib = 2.0**30
    for case, impls, base_name in (
        ("KD (forward KL to teacher_ft, λ = 0)", KD_IMPLS, "trl_gkd"),
        ("Delta-KD (3 frozen references, α = 1, forward KL)", DELTA_IMPLS, "naive_delta"),
    ):
        rows = {i: results[i] for i in impls if i in results}
        if not rows:
            continue
        base = rows.get(base_name)
        first = next(iter(rows.values()))
        print(f"\n{case}: V={first['vocab']}, {sum(first['tokens'])} tokens in {first['steps']} "
              f"steps ({sum(first['response_tokens'])} response tokens)")  # fmt: skip
        print(f"  {'implementation':<20} {'tokens/s':>9} {'resp tok/s':>10} {'× ' + base_name:>14} "
              f"{'peak RSS GiB':>12} {'growth GiB':>10} {'peak × base':>11} {'step-1 loss':>12}")  # fmt: skip
        for i, r in rows.items():
            speed = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}" if base else "-"
            mem = f"{r['peak_rss_bytes'] / base['peak_rss_bytes']:.2f}" if base else "-"
            growth = (r["peak_rss_bytes"] - r["baseline_rss_bytes"]) / gib
            print(f"  {i:<20} {r['tokens_per_s']:>9.1f} {r['response_tokens_per_s']:>10.1f} "
                  f"{speed:>14} {r['peak_rss_bytes'] / gib:>12.2f} {growth:>10.2f} {mem:>11} "
                  f"{r['losses'][0]:>12.7f}")  # fmt: skip
            if r.get("peak_cuda_bytes"):
                print(f"  {'':<20} peak CUDA allocated {r['peak_cuda_bytes'] / gib:.2f} GiB")
        firsts = [r["losses"][0] for r in rows.values()]
        same_tokens = len({tuple(r["tokens"]) for r in rows.values()}) == 1
        ref = firsts[0]
        spread = max(abs(x - ref) for x in firsts) / max(abs(ref), 1e-30)
        agree[case] = spread <= LOSS_RTOL and same_tokens
        verdict = "agree" if agree[case] else "DO NOT AGREE"
        print(f"  step-1 losses {verdict}: largest relative difference {spread:.1e} "
              f"(≤ {LOSS_RTOL:.0e} expected); same tokens in every step: {same_tokens}")  # fmt: skip
        timed = statistics.mean(r["seconds"] for r in rows.values())
        print(
            f"  timed: steps {args.warmup + 1}–{args.steps} (mean {timed:.1f} s per implementation)"
        )
    if results:
        print("tokens/s counts all non-padding tokens; peak RSS is the whole process (models, "
              "optimizer state, activations); the machine may be shared: read the ratios")  # fmt: skip
    return agree


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--peers", action="store_true",
                        help="also run TRL's GKDTrainer (KD) and a naive transformers.Trainer "
                             "(Delta-KD) beside deltakd")  # fmt: skip
    parser.add_argument("--world", choices=("mini", "real"), default="mini",
                        help="mini: the shipped mini world; real: random Qwen2.5-shaped models "
                             "with --layers layers (needs ~10 GiB for Delta-KD)")  # fmt: skip
    parser.add_argument("--impls", default=None,
                        help=f"comma-separated subset of {', '.join(IMPLS)}")  # fmt: skip
    parser.add_argument("--python", default=None,
                        help="interpreter for every worker (e.g. a venv with the bench extra); "
                             "default: this one")  # fmt: skip
    add_worker_arguments(parser)


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, default=None, help="rows per step (mini 8, real 2)")
    parser.add_argument("--max-length", type=int, default=None, help="tokens per row (256)")
    parser.add_argument("--turns", type=int, default=None,
                        help="mini:instruct rows joined into one chat (6)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (mini 6, real 3)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="first steps left out of the timing (mini 2, real 1)")  # fmt: skip
    parser.add_argument("--layers", type=int, default=None,
                        help="decoder layers of the real-shape models (1)")  # fmt: skip
    parser.add_argument("--teacher-intermediate", type=int, default=4864,
                        help="the real-shape teachers' MLP width (18,944 in Qwen2.5-7B)")  # fmt: skip
    parser.add_argument("--teacher-shape", choices=("7b", "1.5b"), default="7b",
                        help="real-shape teachers at Qwen2.5-7B's width (default) or at the "
                             "student's (1.5B, for machines without ~12 GiB free)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, or auto (this process's GPU)")
    parser.add_argument("--tokenizer", default=None, help=argparse.SUPPRESS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deltakd.bench.train_peers")
    parser.add_argument("--worker", choices=IMPLS, required=True)
    parser.add_argument("--world", choices=("mini", "real"), default="mini")
    add_worker_arguments(parser)
    args = parser.parse_args(argv)
    _fill_defaults(args)
    args.tokenizer = args.tokenizer or "mini:tokenizer"
    return _worker(args)


if __name__ == "__main__":
    sys.exit(main())
