"""The paper's experiments in the miniature world, with several seeds (docs/RESULTS.md).

Every run uses the demo's training and evaluation settings (`deltakd.demo`: the mixture
`mini:instruct+mini:math`, 300 steps, greedy decoding on 150 test items per task), so the
tables compare like with like. Runs are resumable: a run with `scores.json` is skipped, and
`deltakd.train.train` resumes or reuses a finished training run in place.

    python scripts/mini_experiments.py --world v2 --groups table1,alpha --seeds 0,1,2
    python scripts/mini_experiments.py --world v2 --groups table1,alpha --report

`--world v1|v2` picks the shipped world (runs go under runs/exp-WORLD unless `--out`); each
scores.json records the world, the code's commit and the sha256 of the world's models. MiniLLM
starts from the same seed's `sft` run (as its authors do), so that run trains first; a shard
whose MiniLLM run waits for the other shard's SFT polls until it is there.

`--shard i/n` runs every n-th run (use two shards, one per core, with one torch thread each).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

#: multi_teacher averages teacher_ft with teacher_ft2, the world's second SFT of teacher_raw.
VARIANTS = ("delta", "delta_rkl", "multi_teacher", "live_shift", "live_shift_sg", "live_anchor",
            "live_anchor_sg")  # fmt: skip


def _delta_kd(**overrides: Any) -> dict[str, Any]:
    return {"method": "delta_kd", "divergence": "fkl", "alpha": 1.0, "lam": 0.0, **overrides}


def _variant(name: str, clip: float) -> dict[str, Any]:
    return {"method": "parallelogram", "variant": name, "alpha": 1.0, "lam": 0.0,
            "max_grad_norm": clip}  # fmt: skip


#: Stands for the world's own pretraining corpus in a run's `method_args.pt_dataset`.
WORLD_CORPUS = "<world corpus>"
CORPUS = {"v1": "mini:corpus", "v2": "mini2:corpus"}

#: group -> run name -> config overrides on top of the demo's settings. `same_as` names a run
#: of identical config trained under another name (reported, not trained twice). Run keys that
#: are not config fields: `student` (the world's student role, default student_raw) and
#: `init_from` (start from this run's final model of the same seed, which must run first).
GROUPS: dict[str, dict[str, dict[str, Any]]] = {
    "table1": {
        "sft": {"method": "sft", "lam": 1.0},
        "fkl": {"method": "kd", "divergence": "fkl", "lam": 0.0},
        "rkl": {"method": "kd", "divergence": "rkl", "lam": 0.0},
        "seqkd": {"method": "seqkd", "lam": 1.0, "method_args": {"batch_size": 64}},
        # As its authors run it: from the same seed's SFT'd student (`init_from`), PPO over
        # stored rollouts, whitened advantages, the world's pretraining corpus as LM term.
        "minillm": {
            "method": "minillm",
            "lam": 0.0,
            "init_from": "sft",
            "method_args": {
                "importance_clip": None,
                "ppo_epochs": 4,
                "cliprange": 0.2,
                "advantage_norm": True,
                "pt_dataset": WORLD_CORPUS,
                "pt_weight": 1.0,
            },
        },
        "delta_kd": _delta_kd(),
    },
    "alpha": {
        # z* = z_teacher_ft exactly, i.e. the `fkl` run's loss: issue 7's three alpha_0.0 runs
        # reproduced the fkl runs to the last digit, so it is no longer trained twice
        "alpha_0.0": {"same_as": "fkl"},
        **{f"alpha_{a}": _delta_kd(alpha=a) for a in (0.25, 0.5, 0.75)},
        "alpha_1.0": {"same_as": "delta_kd"},
        "alpha_1.5": _delta_kd(alpha=1.5),
    },
    # Robust Delta-KD (issue 16): the raw models' log-probs floored at -8 before differencing,
    # against plain Delta-KD trained in the same world at the same code.
    "floor": {
        "delta_kd": _delta_kd(),
        "delta_kd_floor": _delta_kd(delta_floor=-8.0),
    },
    # The α sweep with the student twice as large (world v2), with its own fkl and sft rows.
    "alpha_2x": {
        "sft_2x": {"method": "sft", "lam": 1.0, "student": "student_raw_2x"},
        "fkl_2x": {"method": "kd", "divergence": "fkl", "lam": 0.0, "student": "student_raw_2x"},
        "alpha_2x_0.0": {"same_as": "fkl_2x"},
        **{
            f"alpha_2x_{a}": _delta_kd(alpha=a, student="student_raw_2x")
            for a in (0.25, 0.5, 0.75, 1.0, 1.5)
        },
    },
    "variants": {
        "delta": {"same_as": "delta_kd"},  # the catalogue's `delta` is Delta-KD itself
        **{v: _variant(v, clip=1.0) for v in VARIANTS if v != "delta"},
        # Is clipping what keeps the live-gradient variants alive?
        **{f"{v}_noclip": _variant(v, clip=0.0) for v in ("delta", "live_shift", "live_anchor")},
    },
    "lamtau": {
        "lam_0.0_tau_1.0": {"same_as": "delta_kd"},
        **{
            f"lam_{lam}_tau_{tau}": _delta_kd(lam=lam, temperature=tau)
            for lam, tau in ((0.0, 2.0), (0.5, 1.0), (0.5, 2.0))
        },
    },
}
STEPS = 300


def world_record(world_dir: Path) -> dict[str, Any]:
    """What a run was trained in: the code's commit and the sha256 of every model of the world."""
    import hashlib
    import subprocess

    def sh(*cmd: str) -> str:
        return subprocess.run(cmd, capture_output=True, text=True, check=False).stdout.strip()

    hashes = {
        p.parent.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(world_dir.glob("*/model.safetensors"))
    }
    return {
        "world_dir": str(world_dir),
        "commit": sh("git", "rev-parse", "HEAD"),
        "dirty": bool(sh("git", "status", "--porcelain", "--untracked-files=no")),
        "model_sha256": hashes,
    }


def resolve(
    overrides: dict[str, Any], seed: int, out: Path, world: str
) -> tuple[dict[str, Any], str]:
    """The config overrides of one run (run keys resolved) and its student role."""
    cfg = dict(overrides)
    student = cfg.pop("student", "student_raw")
    init_from = cfg.pop("init_from", None)
    if init_from is not None:
        final = out / init_from / f"seed-{seed}" / "final"
        if not (out / init_from / f"seed-{seed}" / "scores.json").is_file():
            raise RuntimeError(
                f"{init_from} seed {seed} has not finished under {out}; run it first"
            )
        cfg["student_raw"] = str(final.resolve())
    if cfg.get("method_args", {}).get("pt_dataset") == WORLD_CORPUS:
        cfg["method_args"] = {**cfg["method_args"], "pt_dataset": CORPUS[world]}
    return cfg, student


def run_one(
    name: str, overrides: dict[str, Any], seed: int, out: Path, world: str = "v1"
) -> dict[str, Any]:
    """Train (or resume) one run and score it on both tasks; returns what scores.json holds."""
    from deltakd.data.mini import mini_world_dir
    from deltakd.demo import DemoSettings, evaluate_tasks, mini_run_config
    from deltakd.errors import NonFiniteError
    from deltakd.train.api import train

    run_dir = out / name / f"seed-{seed}"
    start = time.perf_counter()
    cfg, student = resolve(overrides, seed, out, world)
    config = mini_run_config(cfg, max_steps=STEPS, seed=seed, output_dir=run_dir, world=world,
                             student=student)  # fmt: skip
    record: dict[str, Any] = {"name": name, "seed": seed, "overrides": overrides, "world": world}
    record.update(world_record(mini_world_dir(world)), student=student, config_overrides=cfg)
    try:
        result = train(config)
    except NonFiniteError as exc:  # a diverged run is a result, not a crash of the grid
        record.update(diverged=True, error=str(exc).splitlines()[0])
        history = _read_history(run_dir)
    else:
        record["diverged"] = False
        history = result.history
        record.update(evaluate_tasks(result.final_dir, DemoSettings.for_mode(False), run_dir))
    norms = [h["grad_norm"] for h in history if "grad_norm" in h]
    losses = [h["loss"] for h in history if "loss" in h]
    record.update(
        max_grad_norm=max(norms) if norms else None,
        final_grad_norm=norms[-1] if norms else None,
        final_loss=losses[-1] if losses else None,
        seconds=time.perf_counter() - start,
    )
    return record


def _read_history(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "history.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def report(groups: list[str], out: Path) -> str:
    """Markdown tables, mean ± std over the seeds found, one per group."""
    from deltakd.eval.metrics import mean_std

    def cell(values: list[float], scale: float = 100.0) -> str:
        if not values:
            return "-"
        mean, std = mean_std(values)
        return (
            f"{scale * mean:.1f} ± {scale * std:.1f}" if len(values) > 1 else f"{scale * mean:.1f}"
        )

    parts = []
    recs_all = [json.loads(p.read_text()) for p in sorted(out.glob("*/seed-*/scores.json"))]
    if recs_all:
        commits = sorted({r.get("commit", "?")[:10] + ("+dirty" if r.get("dirty") else "")
                          for r in recs_all})  # fmt: skip
        hashes = {json.dumps(r.get("model_sha256", {}), sort_keys=True) for r in recs_all}
        head = [f"World {recs_all[0].get('world', 'v1')} ({out}); code at {', '.join(commits)}."]
        if len(hashes) == 1:
            models = json.loads(hashes.pop())
            head.append("Models (sha256 of model.safetensors, first 12 hex): "
                        + ", ".join(f"{k} {v[:12]}" for k, v in models.items()) + ".")  # fmt: skip
        else:
            head.append(f"WARNING: runs under {out} used {len(hashes)} different sets of models.")
        parts.append(" ".join(head))
    for group in groups:
        lines = [
            f"### {group}\n",
            "| run | seeds | instruct ROUGE-1 | math ROUGE-1 | math exact match "
            "| max grad norm | diverged |",
            "|---|---|---|---|---|---|---|",
        ]
        own = False
        for name, overrides in GROUPS[group].items():
            source = overrides.get("same_as", name)
            found = sorted((out / source).glob("seed-*/scores.json"))
            recs = [json.loads(p.read_text()) for p in found]
            if not recs:
                continue
            own = own or source == name
            ok = [r for r in recs if not r["diverged"]]
            norms = [r["max_grad_norm"] for r in recs if r["max_grad_norm"] is not None]
            lines.append(
                f"| {name if source == name else f'{name} (= {source})'} | {len(recs)} | {cell([r['instruct_rouge1'] for r in ok])} "
                f"| {cell([r['math_rouge1'] for r in ok])} "
                f"| {cell([r['math_exact_match'] for r in ok])} "
                f"| {cell(norms, 1.0)} | {len(recs) - len(ok)} |"
            )
        if own:  # a group none of whose own runs has finished is left out
            parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", default="table1", help=f"comma list of {', '.join(GROUPS)}")
    parser.add_argument("--seeds", default="0,1,2", help="comma list of seeds")
    parser.add_argument("--world", choices=("v1", "v2"), default="v1", help="shipped mini world")
    parser.add_argument("--out", default=None, help="where runs and tables go (runs/exp-WORLD)")
    parser.add_argument("--shard", default="0/1", help="i/n: run every n-th run, from the i-th")
    parser.add_argument("--only", default=None, help="comma list of run names to restrict to")
    parser.add_argument("--report", action="store_true", help="only print the tables")
    args = parser.parse_args(argv)
    groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        parser.error(f"unknown groups {unknown}; choose from {', '.join(GROUPS)}")
    out = Path(args.out or f"runs/exp-{args.world}")
    if args.report:
        text = report(groups, out)
        print(text)
        (out / "report.md").write_text(text, encoding="utf-8")
        return 0

    import torch

    torch.set_num_threads(1)  # tiny models: one thread per process, one process per core
    index, count = (int(x) for x in args.shard.split("/"))
    seeds = [int(s) for s in args.seeds.split(",")]
    only = set(args.only.split(",")) if args.only else None
    runs: dict[tuple[str, int], dict[str, Any]] = {}
    for group in groups:
        for name, overrides in GROUPS[group].items():
            if "same_as" in overrides or (only is not None and name not in only):
                continue
            for seed in seeds:
                # a run listed in two groups (floor's delta_kd is table1's) is trained once
                assert runs.setdefault((name, seed), overrides) == overrides, name
    all_runs = list(runs.items())
    todo = all_runs[index::count]
    pending = list(enumerate(todo, 1))
    while pending:
        waiting = []
        for i, ((name, seed), overrides) in pending:
            path = out / name / f"seed-{seed}" / "scores.json"
            if path.exists():
                continue
            dep = overrides.get("init_from")
            if dep and not (out / dep / f"seed-{seed}" / "scores.json").exists():
                if (dep, seed) not in runs:
                    print(f"skip {name} seed {seed}: run {dep} seed {seed} first", flush=True)
                else:  # another shard (or a later place in this one) trains it
                    waiting.append((i, ((name, seed), overrides)))
                continue
            print(f"[{i}/{len(todo)}] {name} seed {seed} ({args.world})", flush=True)
            record = run_one(name, overrides, seed, out, args.world)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
            print(f"    done in {record['seconds']:.0f} s: "
                  f"{ {k: round(v, 3) for k, v in record.items() if k.endswith('rouge1')} }", flush=True)  # fmt: skip
        if waiting and len(waiting) == len(pending):
            print(f"waiting for {[w[1][0] for w in waiting]}' dependencies", flush=True)
            time.sleep(30)
        pending = waiting
    return 0


if __name__ == "__main__":
    sys.exit(main())
