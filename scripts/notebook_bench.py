"""Measurements for issue 17 (docs/BENCHMARKS.md, "Notebook trainer"), on the mini world.

    python scripts/notebook_bench.py lora      # memory: LoRA student_raw shared vs a third model
    python scripts/notebook_bench.py padding   # tokens/s with and without group_by_length

`lora` builds three Delta-KD trainers in one process (full finetuning, LoRA with a separate
frozen student_raw, LoRA with student_raw = the student with adapters disabled) and prints the
bytes of the parameters each one holds (student + every reference model) and the resident set
after each build. `padding` trains the mini student with SFT on rows whose lengths follow a
long-tailed (log-normal) distribution, a synthetic stand-in for UltraChat's (no Hub access
here), random batches vs length-grouped ones, alternating in one process.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import tempfile
from pathlib import Path
from typing import Any

import torch


def _param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def lora(out: Path) -> dict[str, Any]:
    from datasets import Dataset

    from deltakd import DeltaKDConfig, DeltaKDTrainer
    from deltakd.data.specs import load_rows

    data = Dataset.from_list(
        [{"messages": r["messages"]} for r in load_rows("mini:instruct", limit=32)]
    )
    base = {"method": "delta_kd", "max_steps": 2, "per_device_batch_size": 8, "max_length": 128,
            "save_steps": 0, "progress": False, "device": "cpu", "resume": "never"}  # fmt: skip
    variants = {
        "full finetuning": {},
        "LoRA, separate student_raw": {"peft": {"r": 8, "share_base": False}},
        "LoRA, student_raw = adapters disabled": {"peft": {"r": 8}},
    }
    rows = {}
    for name, extra in variants.items():
        gc.collect()
        before = _rss_mib()
        trainer = DeltaKDTrainer(model="mini:student_raw", teacher_ft="mini:teacher_ft",
                                 teacher_raw="mini:teacher_raw", train_dataset=data,
                                 args=DeltaKDConfig(**base, **extra, output_dir=str(out / name)))  # fmt: skip
        trainer.train()
        refs = trainer.references.models
        frozen = {role: _param_bytes(m) for role, m in refs.items()}
        rows[name] = {
            "student_param_bytes": _param_bytes(trainer.model),
            "reference_param_bytes": frozen,
            "total_param_bytes": _param_bytes(trainer.model) + sum(frozen.values()),
            "trainable_params": sum(
                p.numel() for p in trainer.model.parameters() if p.requires_grad
            ),
            "rss_growth_mib": round(_rss_mib() - before, 1),
        }
        trainer.close()
        del trainer, refs
    return rows


def padding(out: Path, steps: int, repeats: int) -> dict[str, Any]:
    from datasets import Dataset

    from deltakd import DeltaKDConfig, DeltaKDTrainer

    rng = random.Random(0)
    words = ["the", "fox", "is", "red", "and", "alice", "has", "three", "apples", "today"]
    # log-normal reply lengths (median ~40 words, long tail), capped by max_length below
    data = []
    for _ in range(2000):
        n = max(1, min(400, int(rng.lognormvariate(3.7, 0.9))))
        data.append({"prompt": " ".join(rng.choices(words, k=rng.randint(3, 30))),
                     "response": " ".join(rng.choices(words, k=n))})  # fmt: skip
    ds = Dataset.from_list(data)
    base = {"method": "sft", "lam": 1.0, "max_steps": steps, "per_device_batch_size": 16,
            "max_length": 512, "logging_steps": steps, "save_steps": 0, "progress": False,
            "device": "cpu", "resume": "never", "learning_rate": 1e-3}  # fmt: skip
    results: dict[str, list[dict[str, float]]] = {"random": [], "group_by_length": []}
    for rep in range(repeats):
        for name in results:
            trainer = DeltaKDTrainer(model="mini:student_raw", train_dataset=ds,
                                     args=DeltaKDConfig(**base, group_by_length=name != "random",
                                                        output_dir=str(out / f"{name}{rep}")))  # fmt: skip
            metrics = trainer.train().metrics
            log = next(h for h in trainer.state.log_history if "tokens_per_s" in h)
            results[name].append({"tokens_per_s": log["tokens_per_s"],
                                  "pad_fraction": log["pad_fraction"],
                                  "train_runtime": metrics["train_runtime"]})  # fmt: skip
    summary = {}
    for name, runs in results.items():
        summary[name] = {k: sum(r[k] for r in runs) / len(runs) for k in runs[0]}
    summary["speedup"] = (
        summary["group_by_length"]["tokens_per_s"] / summary["random"]["tokens_per_s"]
    )
    return {"runs": results, "mean": summary}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("what", choices=("lora", "padding"))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        if args.what == "lora":
            result = lora(Path(tmp))
        else:
            result = padding(Path(tmp), args.steps, args.repeats)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
