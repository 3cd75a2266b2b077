"""`deltakd sweep`: train and evaluate every point of a grid of config overrides.

Layout of a sweep directory::

    OUT/
      sweep.json                 the grid, the fixed overrides and the run names
      <run-name>/                one training run (the trainer's output_dir)
        final/                   the trained student (save_pretrained), written by the trainer
        sweep.json               this run's overrides (what the report groups on)
        eval/                    predictions.jsonl, summary.md, metrics.json
        eval.json                the run's scores; its presence marks the run finished
        failed.json              instead of eval.json when training diverged (NaN/inf)

Re-running the same command skips finished runs, evaluates runs that trained but were not
evaluated, and lets the trainer resume unfinished ones from their last checkpoint. A run that
diverged (`NonFiniteError`, e.g. a parallelogram variant whose gradient norm blows up) is
recorded in `failed.json`, the sweep goes on with the next run, and later sweeps skip it
unless asked to retry (`retry_failed`).
"""

from __future__ import annotations

import itertools
import json
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from deltakd.config import nest_overrides, parse_scalar, split_override
from deltakd.errors import ConfigError
from deltakd.generation import GenerationSettings

# train_fn(config_path, overrides) runs one training run to completion; overrides hold
# `output_dir`. It is the trainer's Python API by default and injectable for tests.
TrainFn = Callable[[str, dict[str, Any]], Any]

logger = logging.getLogger("deltakd.eval")

FINAL_DIR = "final"
EVAL_FILE = "eval.json"
FAILED_FILE = "failed.json"
RUN_META = "sweep.json"


def parse_grid(items: Iterable[str]) -> dict[str, list[Any]]:
    """`["alpha=0,0.5,1", "seed=0,1"]` -> `{"alpha": [0, 0.5, 1], "seed": [0, 1]}`.

    Values are YAML scalars (so `0.5` is a float and `fkl` a string); a key may not repeat.
    """
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or not raw.strip():
            raise ConfigError(
                f"grid axis {item!r} is not KEY=V1,V2,...: write e.g. `alpha=0,0.5,1 seed=0,1,2`."
            )
        if key in grid:
            raise ConfigError(
                f"grid axis {key!r} is given twice; list all its values once: {key}=a,b,c."
            )
        values = [parse_scalar(v.strip(), item) for v in raw.split(",")]
        if len(set(map(repr, values))) != len(values):
            raise ConfigError(f"grid axis {item!r} repeats a value; list each value once.")
        grid[key] = values
    if not grid:
        raise ConfigError("the grid is empty; pass at least one axis, e.g. --grid seed=0,1,2.")
    return grid


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """`["max_steps=20"]` -> `{"max_steps": 20}` (flat, dotted keys kept as written)."""
    return dict(split_override(item) for item in items)


def expand_grid(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Cartesian product of the axes, in axis order (the last axis varies fastest)."""
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def _fmt(value: Any) -> str:
    text = (
        "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    )
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-") or "x"


def run_name(point: Mapping[str, Any]) -> str:
    """A directory name for a grid point, e.g. `alpha-0.5_seed-1`."""
    return "_".join(f"{re.sub(r'[^A-Za-z0-9.]+', '-', k)}-{_fmt(v)}" for k, v in point.items())


def is_trained(run_dir: Path) -> bool:
    final = run_dir / FINAL_DIR
    return final.is_dir() and (final / "config.json").is_file()


def is_finished(run_dir: Path) -> bool:
    """A run is finished when its final model and its eval results both exist."""
    return is_trained(run_dir) and (run_dir / EVAL_FILE).is_file()


def default_train_fn(config_path: str, overrides: dict[str, Any]) -> Any:
    """Train through the trainer's Python API (`deltakd.train`)."""
    from deltakd.config import load_config
    from deltakd.train import train  # type: ignore[attr-defined]

    return train(load_config(config_path, nest_overrides(overrides)))


def _eval_defaults(
    config_path: str, overrides: Mapping[str, Any], eval_data: str | None, eval_split: str | None
) -> tuple[str, str, bool]:
    """(data spec, tokenizer path, whether the eval rows are the training rows) of a run."""
    from deltakd.config import load_config
    from deltakd.data.specs import parse_spec

    cfg = load_config(config_path, nest_overrides(overrides))
    data = eval_data or cfg.dataset
    same = False
    if data == cfg.dataset:
        spec = parse_spec(data)
        train_split = cfg.train_split or spec.default_train_split
        test_split = eval_split or spec.default_eval_split
        same = test_split == train_split or (spec.kind == "jsonl" and "{split}" not in data)
    return data, cfg.tokenizer_path, same


def run_sweep(
    config: str | Path | Sequence[str | Path],
    grid: Mapping[str, Sequence[Any]],
    *,
    out_dir: str | Path = "runs/sweep",
    fixed: Mapping[str, Any] | None = None,
    eval_data: str | None = None,
    eval_split: str | None = None,
    eval_limit: int | None = None,
    settings: GenerationSettings | None = None,
    train_fn: TrainFn | None = None,
    dry_run: bool = False,
    retry_failed: bool = False,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Train and evaluate every grid point into `out_dir/<run-name>`; skip finished runs.

    With several configs (e.g. one per method for a Table-1 comparison) the grid is run for
    each, and run names start with the config's file stem (`kd_seed-0`).

    Returns one record per run: `name`, `dir`, `overrides`, `status` (`done` = skipped as
    finished, `trained` = trained and evaluated now, `evaluated` = only evaluated now,
    `failed` = training diverged (now or in an earlier sweep; see `error`), `planned` in a dry
    run) and `metrics` (the `eval.json` scores).
    """
    from deltakd.errors import NonFiniteError
    from deltakd.eval.evaluate import evaluate_spec

    configs = [str(config)] if isinstance(config, (str, Path)) else [str(c) for c in config]
    if not configs:
        raise ConfigError("no sweep config given; pass at least one YAML training config.")
    for c in configs:
        if not Path(c).is_file():
            raise ConfigError(f"sweep config {c} does not exist; pass a YAML training config.")
    out = Path(out_dir)
    fixed = dict(fixed or {})
    clash = sorted(set(fixed) & set(grid))
    if clash:
        raise ConfigError(f"{clash[0]!r} is both a grid axis and a fixed override; keep one.")
    if "output_dir" in grid or "output_dir" in fixed:
        raise ConfigError("output_dir is set by the sweep (OUT/<run-name>); pass --out instead.")
    jobs = [(c, p) for c in configs for p in expand_grid(grid)]
    if len(configs) > 1:
        names = [f"{Path(c).stem}_{run_name(p)}" for c, p in jobs]
    else:
        names = [run_name(p) for _, p in jobs]
    if len(set(names)) != len(names):
        raise ConfigError(
            "two runs map to the same run name; make the grid values distinct as text and "
            "give the configs distinct file names."
        )
    train_fn = train_fn or default_train_fn
    settings = settings or GenerationSettings()
    if not dry_run:
        out.mkdir(parents=True, exist_ok=True)
        (out / RUN_META).write_text(
            json.dumps(
                {"configs": configs, "grid": dict(grid), "fixed": fixed, "runs": names}, indent=2
            )
            + "\n",
            encoding="utf-8",
        )

    results: list[dict[str, Any]] = []
    for (config, point), name in zip(jobs, names):
        run_dir = out / name
        overrides = {**fixed, **point, "output_dir": str(run_dir)}
        record: dict[str, Any] = {
            "name": name,
            "dir": str(run_dir),
            "config": config,
            "overrides": {**fixed, **point},
        }
        if is_finished(run_dir):
            record["status"] = "done"
            record["metrics"] = json.loads((run_dir / EVAL_FILE).read_text(encoding="utf-8"))
            results.append(record)
            continue
        failed_file = run_dir / FAILED_FILE
        if failed_file.is_file() and not retry_failed:
            record["status"] = "failed"
            record["error"] = json.loads(failed_file.read_text(encoding="utf-8")).get("error")
            results.append(record)
            continue
        if dry_run:
            record["status"] = "planned"
            results.append(record)
            continue
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / RUN_META).write_text(
            json.dumps(
                {"config": config, "overrides": record["overrides"], "point": point}, indent=2
            )
            + "\n",
            encoding="utf-8",
        )
        status = "evaluated"
        if not is_trained(run_dir):
            failed_file.unlink(missing_ok=True)
            try:
                train_fn(config, overrides)
            except NonFiniteError as exc:
                # Divergence is a result (the paper's unstable variants), not a crash: keep
                # it, with the history logged so far, and go on with the grid.
                failed_file.write_text(
                    json.dumps({"error": str(exc), "kind": type(exc).__name__}, indent=2) + "\n",
                    encoding="utf-8",
                )
                record["status"] = "failed"
                record["error"] = str(exc)
                results.append(record)
                continue
            status = "trained"
            if not is_trained(run_dir):
                raise ConfigError(
                    f"run {name}: training returned but {run_dir / FINAL_DIR} holds no model; "
                    "the trainer must save the final student there (save_pretrained)."
                )
        data, tokenizer, on_train_rows = _eval_defaults(config, overrides, eval_data, eval_split)
        if on_train_rows:
            logger.warning(
                "run %s: evaluating on the training rows of %s; pass --eval-data (and "
                "--eval-split) with held-out rows for a fair score.",
                name,
                data,
            )
        final = run_dir / FINAL_DIR
        if (final / "tokenizer_config.json").is_file():
            tokenizer = str(final)
        result = evaluate_spec(
            str(final),
            tokenizer,
            data,
            split=eval_split,
            limit=eval_limit,
            # The training seed varies the run, never the test set (for mini:* the seed picks
            # the world itself), so every run is scored on the same rows.
            seed=0,
            settings=settings,
            out_dir=run_dir / "eval",
            meta={"run": name, "overrides": record["overrides"]},
            progress=progress,
        )
        metrics = {**result.metrics(), "data": data, "split": result.meta["split"]}
        (run_dir / EVAL_FILE).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
        record["status"] = status
        record["metrics"] = metrics
        results.append(record)
        _release_memory()
    return results


def _release_memory() -> None:
    """Free the finished run's tensors before the next run loads its models."""
    import gc

    gc.collect()
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
