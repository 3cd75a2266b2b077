"""`deltakd bench generate`: the same prompts and model through `hf` and `vllm`, side by side.

Each backend runs in its own child process (same interpreter, same torch thread count), so
its peak memory is its own and one engine's threads do not slow the other. Per backend:

- ``load_s``: loading the model (for vLLM: building the engine, which loads it);
- ``first_reply_s``: generating the reply to the first prompt alone (a warm model, one request);
- ``batch_s`` and ``tokens_per_s``: generating every prompt's reply in one call (hf in batches
  of ``--batch-size``; vLLM schedules its own), new tokens counted with their stop token,
  after one warm-up call on the first 32 prompts (both backends);
- ``peak_rss_mib``: the child's peak resident memory (imports, model, KV cache, everything).

Greedy decoding by default, so the run also reports how many replies the two backends agree on.

With ``--on-policy-steps N`` it also times on-policy KD training (`on_policy_ratio: 1`) with the
student's samples from hf's token loop and from the colocated vLLM engine: the median time of
a whole optimizer step over steps 2..N (step 1 builds the engine), from one step's end to the
next's, so drawing the batch and sampling it (which the trainer does before its step-begin
callback) count; the median sampling time and weight sync into the engine; and the mean
sampled tokens per row. The student is ``--on-policy-student``: a model path / `mini:<role>`,
or ``head32`` (the default): the mini world's `student_raw` (hidden 64, 2 layers) with its
weights laid out as 2 attention heads of 32 and 1 KV head instead of 4 × 16 and 2 (the same
tensors, so the same size; its attention is not retrained), because vLLM's CPU attention has no
kernel for 16-wide heads. The teacher is ``--model``.
Figures from a shared machine are noisy; the ratio of the two, taken in one run, is the figure
to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

from deltakd.config.sections import GENERATION_BACKENDS as BACKENDS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="mini:teacher_ft", help="model (mini:teacher_ft)")
    parser.add_argument(
        "--data",
        default="mini:instruct,mini:math",
        help="comma-separated data specs whose test prompts are generated",
    )
    parser.add_argument("--limit", type=int, default=None, help="prompts per data spec (all)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="reply cap (128)")
    parser.add_argument("--batch-size", type=int, default=16, help="hf batch size (16)")
    parser.add_argument(
        "--dtype", default="float32", choices=("float32", "bfloat16"), help="weights (float32)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per backend (1)")
    parser.add_argument(
        "--max-num-seqs", type=int, default=None, help="vLLM requests decoded together (vLLM's)"
    )
    parser.add_argument(
        "--backends", default="hf,vllm", help="comma-separated, in run order (hf,vllm)"
    )
    parser.add_argument(
        "--on-policy-steps", type=int, default=0, help="also time N on-policy KD steps (0: no)"
    )
    parser.add_argument("--on-policy-batch", type=int, default=8, help="rows per step (8)")
    parser.add_argument(
        "--on-policy-student",
        "--student",
        default="head32",
        help="student of the on-policy runs: a path, mini:<role>, or head32 (the mini student "
        "with 32-wide heads; default)",
    )


def run(args: argparse.Namespace) -> int:
    from deltakd.errors import ConfigError

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    for b in backends:
        if b not in BACKENDS:
            raise ConfigError(f"--backends {b!r}: expected a comma-separated subset of hf,vllm.")
    job = {
        "model": args.model,
        "data": args.data,
        "limit": args.limit,
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "dtype": args.dtype,
        "threads": args.threads,
        "max_num_seqs": args.max_num_seqs,
    }
    results: dict[str, Any] = {}
    replies: dict[str, list[str]] = {}
    for backend in backends:
        out = _run_child({**job, "backend": backend})
        replies[backend] = out.pop("replies")
        results[backend] = out
    n = len(next(iter(replies.values()))) if replies else 0
    print(
        f"model {args.model}  prompts {n}  max_new_tokens {args.max_new_tokens}  "
        f"dtype {args.dtype}  torch threads {args.threads}"
    )
    print(
        f"{'backend':<8}{'load s':>9}{'first reply s':>15}{'batch s':>10}"
        f"{'new tokens':>12}{'tokens/s':>10}{'peak RSS MiB':>14}"
    )
    for b, r in results.items():
        print(
            f"{b:<8}{r['load_s']:>9.2f}{r['first_reply_s']:>15.3f}{r['batch_s']:>10.2f}"
            f"{r['new_tokens']:>12d}{r['tokens_per_s']:>10.1f}{r['peak_rss_mib']:>14.0f}"
        )
    summary: dict[str, Any] = {"n": n, **results}
    if "hf" in results and "vllm" in results:
        speedup = results["vllm"]["tokens_per_s"] / results["hf"]["tokens_per_s"]
        agree = sum(a == b for a, b in zip(replies["hf"], replies["vllm"], strict=True))
        summary.update(speedup=speedup, agreement=agree / max(n, 1), agree=agree)
        print(f"vllm / hf tokens/s: {speedup:.2f}x")
        print(f"identical replies (greedy): {agree}/{n}")
    if args.on_policy_steps > 0:
        policy: dict[str, Any] = {}
        for backend in backends:
            policy[backend] = _run_child(
                {**job, "backend": backend, "mode": "on_policy",
                 "steps": args.on_policy_steps, "student": args.on_policy_student,
                 "rows": args.on_policy_batch}
            )  # fmt: skip
        print(
            f"on-policy KD, student {args.on_policy_student}, teacher {args.model}, "
            f"{args.on_policy_steps} steps of {args.on_policy_batch} rows, "
            f"max_new_tokens {args.max_new_tokens}"
        )
        for b, r in policy.items():
            sync = f", weight sync {1000 * r['sync_s']:.1f} ms" if r.get("sync_s") else ""
            print(
                f"{b:<8} step {r['step_s']:.3f} s (median of steps 2..), of which sampling "
                f"{r['sample_s']:.3f} s{sync}; {r['sampled_tokens']:.1f} sampled tokens/row"
            )
        if "hf" in policy and "vllm" in policy:
            ratio = policy["vllm"]["step_s"] / policy["hf"]["step_s"]
            policy["step_ratio"] = ratio
            print(f"vllm / hf on-policy step time: {ratio:.2f}")
        summary["on_policy"] = policy
    if args.json:
        print(json.dumps(summary))
    return 0


def _run_child(job: dict[str, Any]) -> dict[str, Any]:
    from deltakd.errors import DeltaKDError

    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(job["threads"])
    proc = subprocess.run(
        [sys.executable, "-m", "deltakd.bench.generate", json.dumps(job)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
        raise DeltaKDError(f"the {job['backend']} generation run failed:\n{tail}")
    return json.loads(lines[-1])


def _prompts(data: str, limit: int | None) -> list[Any]:
    from deltakd.eval.evaluate import load_eval_rows, split_row

    prompts: list[Any] = []
    for spec in (s.strip() for s in data.split(",") if s.strip()):
        rows = load_eval_rows(spec, None, limit=limit)
        prompts += [split_row(r, i)[0] for i, r in enumerate(rows)]
    return prompts


def _child(job: dict[str, Any]) -> dict[str, Any]:
    """One backend's figures (runs in the child process)."""
    import resource

    import torch
    from transformers import AutoTokenizer

    from deltakd.data.vocab import resolve_model_path
    from deltakd.generation import GenerationSettings

    torch.set_num_threads(int(job["threads"]))
    path = resolve_model_path(job["model"])
    tok = AutoTokenizer.from_pretrained(path)
    prompts = _prompts(job["data"], job["limit"])
    settings = GenerationSettings(
        max_new_tokens=int(job["max_new_tokens"]), batch_size=int(job["batch_size"])
    )
    start = time.perf_counter()
    if job["backend"] == "vllm":
        from deltakd.generation.vllm import VLLMEngine, VLLMSettings

        engine = VLLMEngine(
            path, VLLMSettings(dtype=job["dtype"], max_num_seqs=job.get("max_num_seqs"))
        )
        load_s = time.perf_counter() - start

        def gen(ps: list[Any]) -> tuple[list[str], int]:
            out = engine.generate(tok, ps, settings)
            return [g.text for g in out], sum(
                len(g.token_ids) + (g.finish_reason == "stop") for g in out
            )
    else:
        from transformers import AutoModelForCausalLM

        from deltakd.generation import generate

        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, job["dtype"]))
        load_s = time.perf_counter() - start

        def gen(ps: list[Any]) -> tuple[list[str], int]:
            out = generate(model, tok, ps, settings, progress=False)
            # +1 for the stop token of a reply that ended before the cap (vLLM's count has it).
            return [g.text for g in out], sum(
                len(g.token_ids) + (g.finish_reason == "stop") for g in out
            )

    start = time.perf_counter()
    gen(prompts[:1])
    first = time.perf_counter() - start
    gen(prompts[:32])  # warm-up at a batch shape (both backends alike)
    start = time.perf_counter()
    texts, new_tokens = gen(prompts)
    batch = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {
        "load_s": load_s,
        "first_reply_s": first,
        "batch_s": batch,
        "new_tokens": new_tokens,
        "tokens_per_s": new_tokens / batch,
        "peak_rss_mib": peak,
        "replies": texts,
    }


def build_head32_student(out: str) -> str:
    """The mini `student_raw` with 2 attention heads of 32 and 1 KV head (instead of 4 × 16 and
    2): the same tensors, re-read in a layout vLLM's CPU attention supports. Saved with the
    mini tokenizer to `out`, which is returned."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deltakd.data.vocab import resolve_model_path

    path = resolve_model_path("mini:student_raw")
    model = AutoModelForCausalLM.from_pretrained(path)
    config = model.config
    heads = config.hidden_size // 32
    kv = max(1, config.num_key_value_heads * heads // config.num_attention_heads)
    config_32 = type(config)(**{**config.to_dict(), "num_attention_heads": heads,
                                "num_key_value_heads": kv, "head_dim": 32})  # fmt: skip
    student = type(model)(config_32)
    student.load_state_dict(model.state_dict(), strict=True)  # same shapes: q (64, 64), k (32, 64)
    student.save_pretrained(out)
    AutoTokenizer.from_pretrained(path).save_pretrained(out)
    return out


def _on_policy_child(job: dict[str, Any]) -> dict[str, Any]:
    """Median on-policy KD step time (and sampling, vLLM weight sync) for one backend."""
    import statistics
    import tempfile

    import torch
    from transformers import TrainerCallback

    import deltakd.train.on_policy as on_policy
    from deltakd.train import load_config, train

    torch.set_num_threads(int(job["threads"]))
    syncs: list[float] = []
    samples: list[float] = []
    lengths: list[float] = []
    if job["backend"] == "vllm":
        from deltakd.generation.vllm import VLLMEngine

        load = VLLMEngine.load_weights

        def timed(self: Any, weights: Any) -> float:
            seconds = load(self, weights)
            syncs.append(seconds)
            return seconds

        VLLMEngine.load_weights = timed  # type: ignore[method-assign]
    sample = on_policy.StudentSampler.sample

    def timed_sample(self: Any, *a: Any, **k: Any) -> dict[str, Any]:
        start = time.perf_counter()
        batch = sample(self, *a, **k)
        samples.append(time.perf_counter() - start)
        mask = batch["assistant_mask"]  # (B, T): the sampled tokens
        lengths.append(float(mask.sum()) / mask.shape[0])
        return batch

    on_policy.StudentSampler.sample = timed_sample  # type: ignore[method-assign]

    class StepTimes(TrainerCallback):
        """Step end to step end: the trainer draws and samples a step's batch before its
        `on_step_begin`, so begin-to-end would leave the sampling out."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self._t = 0.0

        def on_train_begin(self, *a: Any, **k: Any) -> None:
            self._t = time.perf_counter()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            now = time.perf_counter()
            self.times.append(now - self._t)
            self._t = now

    steps = StepTimes()
    with tempfile.TemporaryDirectory(prefix="deltakd-bench-onpolicy-") as out:
        student = job["student"]
        if student == "head32":
            student = build_head32_student(f"{out}/student")
        config = load_config(
            None,
            {
                "method": "kd",
                "on_policy_ratio": 1.0,
                "student_raw": student,
                "teacher_ft": job["model"],
                "teacher_raw": "mini:teacher_raw",
                "tokenizer": "mini:tokenizer",
                "dataset": "mini:instruct",
                "max_length": 256,
                "max_prompt_length": 128,
                "max_new_tokens": int(job["max_new_tokens"]),
                "per_device_batch_size": int(job["rows"]),
                "max_steps": int(job["steps"]),
                "precision": "fp32",
                "device": "cpu",
                "progress": False,
                "save_steps": 0,
                "resume": "never",
                "output_dir": f"{out}/run",
                "generation": {"backend": job["backend"]} if job["backend"] == "vllm" else {},
            },
        )
        train(config, callbacks=[steps])
    later = steps.times[1:] or steps.times
    return {
        "step_s": statistics.median(later),
        "first_step_s": steps.times[0],
        "sample_s": statistics.median(samples[1:] or samples),
        "sampled_tokens": statistics.mean(lengths),
        "sync_s": statistics.median(syncs[1:]) if len(syncs) > 1 else None,
    }


if __name__ == "__main__":
    # The child: vLLM may spawn processes, which re-import this module under this guard.
    _job = json.loads(sys.argv[1])
    print(json.dumps(_on_policy_child(_job) if _job.get("mode") == "on_policy" else _child(_job)))
