"""`deltakd demo`: Delta-KD end to end in the miniature world, offline, on a CPU.

Distils the mini world's student with SFT only, standard KD (forward KL to the finetuned
teacher) and Delta-KD, through the same `deltakd.train.train` that `deltakd train` runs;
evaluates each student, the finetuned teacher and the untrained student on both tasks' test
splits with greedy decoding; prints one table and writes it as Markdown and JSON, with plots.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Methods the demo distils with, and their settings on top of `_BASE`.
METHODS: dict[str, dict[str, Any]] = {
    "sft": {"method": "sft", "lam": 1.0},
    "kd": {"method": "kd", "divergence": "fkl", "lam": 0.0},
    "delta_kd": {"method": "delta_kd", "divergence": "fkl", "alpha": 1.0, "lam": 0.0},
}
TASKS: tuple[str, ...] = ("instruct", "math")

# Shared settings; the mini world's student trains in seconds per hundred steps on 2 cores.
_BASE: dict[str, Any] = {
    "dataset": "mini:instruct+mini:math",
    "temperature": 1.0,
    "learning_rate": 3e-3,
    "lr_scheduler": "cosine",
    "warmup_ratio": 0.05,
    "per_device_batch_size": 16,
    "max_length": 192,
    "max_prompt_length": 128,
    "logging_steps": 10,
    "save_steps": 0,
    "report_to": "none",
    "precision": "fp32",
}


@dataclass(frozen=True)
class DemoSettings:
    """Steps and test items: the full demo and `--quick`."""

    max_steps: int
    eval_limit: int
    max_new_tokens: int

    @classmethod
    def for_mode(cls, quick: bool) -> DemoSettings:
        if quick:
            return cls(max_steps=60, eval_limit=30, max_new_tokens=64)
        return cls(max_steps=300, eval_limit=150, max_new_tokens=96)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the miniature world end to end, offline (SFT vs KD vs Delta-KD)",
        description=__doc__,
    )
    p.add_argument("--quick", action="store_true", help="fewer steps and test items (~1 min)")
    p.add_argument("--seed", type=int, default=0, help="seed of training and sampling order")
    p.add_argument("--out", default=None, help="output directory (default runs/demo-seed<S>)")
    p.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated subset of {', '.join(METHODS)}",
    )
    p.add_argument(
        "--verbose",
        action="store_true",
        help="bring back the libraries' output (loading bars, info logs, raw log dicts)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from deltakd.errors import ConfigError

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    out = Path(args.out or f"runs/demo-seed{args.seed}")
    result = run_demo(out, quick=args.quick, seed=args.seed, methods=methods,
                      verbose=getattr(args, "verbose", False))  # fmt: skip
    print()
    print(result["markdown"])
    print(f"wrote {out}/results.md, results.json, curves.png, rouge1.png")
    print(f"demo took {result['seconds']:.0f} s")
    return 0


def run_demo(
    out_dir: str | Path,
    *,
    quick: bool = False,
    seed: int = 0,
    methods: list[str] | tuple[str, ...] = tuple(METHODS),
    verbose: bool = False,
) -> dict[str, Any]:
    """Train, evaluate and report; returns the table as rows, Markdown and timing."""
    import torch

    from deltakd.data.mini import mini_world_dir
    from deltakd.train.api import train

    torch.set_num_threads(max(1, torch.get_num_threads()))
    start = time.perf_counter()
    settings = DemoSettings.for_mode(quick)
    world = mini_world_dir()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    models: dict[str, str] = {r: str(world / r) for r in ("teacher_ft", "student_raw")}
    histories: dict[str, list[dict[str, Any]]] = {}
    for name in methods:
        print(f"[demo] training {name} ({settings.max_steps} steps)", flush=True)
        # A demo always trains afresh: `train` would otherwise reuse a finished run in place.
        shutil.rmtree(out / name, ignore_errors=True)
        config = mini_run_config(
            {**METHODS[name], "verbose": verbose},
            max_steps=settings.max_steps,
            seed=seed,
            output_dir=out / name,
        )
        result = train(config)
        models[name] = str(result.final_dir)
        histories[name] = result.history

    rows: list[dict[str, Any]] = []
    for name, path in models.items():
        print(f"[demo] evaluating {name}", flush=True)
        rows.append({"model": name, **evaluate_tasks(path, settings, out / "eval" / name)})

    seconds = time.perf_counter() - start
    table = _markdown(rows, settings, seed)
    (out / "results.md").write_text(table + "\n", encoding="utf-8")
    payload = {
        "seed": seed,
        "quick": quick,
        "settings": settings.__dict__,
        "rows": rows,
        "seconds": seconds,
    }
    (out / "results.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    _plots(out, rows, histories)
    return {"rows": rows, "markdown": table, "seconds": seconds, "out_dir": out}


def mini_run_config(
    overrides: dict[str, Any],
    *,
    max_steps: int,
    seed: int,
    output_dir: str | Path,
    world: str = "v1",
    student: str = "student_raw",
) -> Any:
    """The demo's training config on a shipped mini world (`world`: v1 or v2), plus `overrides`.

    `student` is the world's role the student starts from and Delta-KD references as
    student_raw (world v2 also ships `student_raw_2x`, twice as large)."""
    from deltakd.config import config_from_dict
    from deltakd.data.mini import mini_world_dir
    from deltakd.errors import ConfigError

    world_dir = mini_world_dir(world)
    if not (world_dir / student / "config.json").is_file():
        roles = sorted(p.name for p in world_dir.iterdir() if p.name.startswith("student"))
        raise ConfigError(f"mini world {world} has no student {student!r}; use one of {roles}")
    roles = {r: str(world_dir / r) for r in ("teacher_ft", "teacher_raw")}
    roles["student_raw"] = str(world_dir / student)
    if _needs_teacher_ft2(overrides):
        # Only then: a path the run never loads would still sit in its saved config and split
        # `deltakd report`'s groups from runs made without it.
        roles["teacher_ft2"] = str(world_dir / "teacher_ft2")
    return config_from_dict(
        {
            **_BASE,
            **roles,
            **overrides,
            "max_steps": max_steps,
            # Tokenise only the rows the run will see (one pass, no epoch wraps).
            "limit": max_steps * _BASE["per_device_batch_size"],
            "progress": False,
            "seed": seed,
            "output_dir": str(output_dir),
        },
        source="demo",
    )


def _needs_teacher_ft2(overrides: dict[str, Any]) -> bool:
    """Whether the run's parallelogram variant (e.g. multi_teacher) averages two teachers."""
    from deltakd.losses import PARALLELOGRAM_VARIANTS

    variant = PARALLELOGRAM_VARIANTS.get(overrides.get("variant") or "")
    return (
        overrides.get("method") == "parallelogram"
        and variant is not None
        and ("teacher_ft2" in variant.roles)
    )


def evaluate_tasks(model: str | Path, settings: DemoSettings, out_dir: Path) -> dict[str, float]:
    """Greedy test-split scores of one model on every mini task: `{task}_rouge1`, ..."""
    from deltakd.eval.evaluate import evaluate_spec
    from deltakd.generation import GenerationSettings

    scores: dict[str, float] = {}
    for task in TASKS:
        res = evaluate_spec(
            model,
            None,
            f"mini:{task}",
            split="test",
            limit=settings.eval_limit,
            settings=GenerationSettings(max_new_tokens=settings.max_new_tokens),
            out_dir=out_dir / task,
            progress=False,
        )
        scores[f"{task}_rouge1"] = res.rouge1
        scores[f"{task}_rougeL"] = res.rougeL
        if res.exact_match is not None:
            scores[f"{task}_exact_match"] = res.exact_match
    return scores


def _markdown(rows: list[dict[str, Any]], settings: DemoSettings, seed: int) -> str:
    head = (
        "| model | instruct ROUGE-1 | instruct ROUGE-L | math ROUGE-1 | math ROUGE-L "
        "| math exact match |\n|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        em = r.get("math_exact_match")
        lines.append(
            f"| {r['model']} | {100 * r['instruct_rouge1']:.1f} | {100 * r['instruct_rougeL']:.1f}"
            f" | {100 * r['math_rouge1']:.1f} | {100 * r['math_rougeL']:.1f}"
            f" | {'-' if em is None else f'{100 * em:.1f}'} |"
        )
    lines.append(
        f"\nScores ×100 on {settings.eval_limit} test items per task (greedy decoding), "
        f"{settings.max_steps} training steps, seed {seed}."
    )
    return "\n".join(lines)


def _plots(out: Path, rows: list[dict[str, Any]], histories: dict[str, list[dict]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, history in histories.items():
        points = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
        if points:
            ax.plot(*zip(*points), label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("Training curves (mini world)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(TASKS)
    for i, task in enumerate(TASKS):
        xs = [j + i * width for j in range(len(rows))]
        ax.bar(xs, [100 * r[f"{task}_rouge1"] for r in rows], width, label=task)
    ax.set_xticks([j + width * (len(TASKS) - 1) / 2 for j in range(len(rows))])
    ax.set_xticklabels([r["model"] for r in rows])
    ax.set_ylabel("test ROUGE-1")
    ax.set_title("ROUGE-1 by model and task (mini world)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "rouge1.png", dpi=120)
    plt.close(fig)
