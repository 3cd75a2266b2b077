"""`deltakd report`: tables with mean ± std across seeds and PNG plots from run directories.

A run directory is what `deltakd train` / `deltakd sweep` leave behind:

- `eval.json`: the run's scores (`rouge1`, `rouge2`, `rougeL`, `exact_match`, `n`), or
  `scores.json` as `scripts/mini_experiments.py` writes it: per-task scores
  (`instruct_rouge1`, `math_exact_match`, ...), reported as `instruct/rouge1`, ... columns, the
  run's `name` (used as its group's label) and `diverged`;
- its config: `config.yaml` (the trainer's saved config) and/or `sweep.json` (the sweep's
  overrides for this run);
- its training log: `history.jsonl` (one JSON object per logged step) or a HF Trainer
  `trainer_state.json` (`log_history`), in the run directory or its newest checkpoint.

Runs are grouped by every config field that differs between the runs given, except the
seed and bookkeeping fields (output_dir, logging, ...); each group's seeds give mean ± std
(sample standard deviation, ddof=1). A directory that is not a run contributes the runs among
its subdirectories, or else among theirs (e.g. `runs/exp` holding `<name>/seed-<s>/`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from deltakd.errors import DataError
from deltakd.eval.metrics import mean_std

METRIC_KEYS: tuple[str, ...] = ("rouge1", "rouge2", "rougeL", "exact_match")
METRIC_TITLES = {
    "rouge1": "ROUGE-1",
    "rouge2": "ROUGE-2",
    "rougeL": "ROUGE-L",
    "exact_match": "Exact match",
}
#: `scripts/mini_experiments.py`'s per-task record: `<task>_<metric>` keys, `name`, `diverged`.
TASK_SCORES_FILE = "scores.json"
CONFIG_FILES: tuple[str, ...] = ("config.yaml", "config.yml", "train_config.yaml")
HISTORY_FILES: tuple[str, ...] = ("history.jsonl",)
# Fields that never define a group: the seed (averaged over) and run bookkeeping.
NON_GROUPING: frozenset[str] = frozenset(
    {
        "seed", "output_dir", "resume", "progress", "report_to", "logging_steps", "save_steps",
        "save_total_limit", "device", "eval_limit",
    }
)  # fmt: skip
STEP_KEYS: tuple[str, ...] = ("step", "global_step", "optimizer_step")
# Per-step training loss only: the trainer's closing log's `train_loss` is a run average.
LOSS_KEYS: tuple[str, ...] = ("loss",)
GRAD_KEYS: tuple[str, ...] = ("grad_norm", "gradient_norm")


@dataclass
class Run:
    """One run directory: its parameters, scores and logged history."""

    path: Path
    params: dict[str, Any]
    metrics: dict[str, Any] | None
    history: list[dict[str, Any]] = field(default_factory=list)
    eval_only: bool = False  # a `deltakd eval --out` directory: a model scored, no training
    failed: str | None = None  # the error of a run that diverged (`failed.json` of a sweep)
    tag: str | None = None  # a name the run was given (`scores.json`'s `name`), else None

    @property
    def name(self) -> str:
        return self.path.name

    def series(self, keys: Sequence[str]) -> tuple[list[float], list[float]]:
        """(steps, values) of the first of `keys` present in the logged history.

        A step logged twice (a resumed run re-logs the steps after its last checkpoint)
        keeps its latest value.
        """
        by_step: dict[float, float] = {}
        for i, rec in enumerate(self.history):
            key = next((k for k in keys if k in rec), None)
            if key is None or not isinstance(rec[key], (int, float)):
                continue
            by_step[float(next((rec[k] for k in STEP_KEYS if k in rec), i))] = float(rec[key])
        steps = sorted(by_step)
        return steps, [by_step[s] for s in steps]


@dataclass
class Report:
    markdown: str
    groups: list[dict[str, Any]]
    plots: list[str]


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON ({exc.msg}); delete or fix it.") from exc


def _read_history(run_dir: Path) -> list[dict[str, Any]]:
    for name in HISTORY_FILES:
        path = run_dir / name
        if path.is_file():
            rows = []
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        continue  # a run killed mid-write leaves a partial last line
            return rows
    candidates = [run_dir / "trainer_state.json"]
    checkpoints = sorted(
        run_dir.glob("checkpoint-*"),
        key=lambda p: int(m.group(1)) if (m := re.search(r"(\d+)$", p.name)) else -1,
        reverse=True,
    )
    candidates += [c / "trainer_state.json" for c in checkpoints]
    candidates.append(run_dir / "final" / "trainer_state.json")
    for path in candidates:
        if path.is_file():
            return list(_read_json(path).get("log_history", []))
    return []


def load_run(run_dir: str | Path) -> Run:
    """Read a run directory's parameters, eval scores and history."""
    path = Path(run_dir)
    params: dict[str, Any] = {}
    has_config = False
    for name in CONFIG_FILES:
        if (path / name).is_file():
            loaded = yaml.safe_load((path / name).read_text(encoding="utf-8")) or {}
            params.update(_flatten(loaded))
            has_config = True
            break
    if (path / "sweep.json").is_file():
        meta = _read_json(path / "sweep.json")
        # The saved config holds the resolved, typed values; the sweep's overrides only fill
        # in what it lacks (e.g. a run whose trainer saved no config).
        for k, v in _flatten(meta.get("overrides", {})).items():
            params.setdefault(k, v)
        if not has_config and meta.get("config"):
            params["config"] = Path(meta["config"]).stem  # which base config the run came from
    metrics = None
    eval_only = False
    if (path / "eval.json").is_file():
        metrics = _read_json(path / "eval.json")
    elif (path / "metrics.json").is_file():
        # A `deltakd eval --out DIR` directory (e.g. the teacher_ft / student_raw rows of a
        # table): no config, so it is told apart by the model it scored.
        metrics = _read_json(path / "metrics.json")
        if not params:
            eval_only = True
            params["model"] = metrics.get("meta", {}).get("model", path.name)
    failed = None
    tag = None
    if metrics is None and (path / TASK_SCORES_FILE).is_file():
        record = _read_json(path / TASK_SCORES_FILE)
        tag = record.get("name")
        if record.get("diverged"):
            failed = str(record.get("error") or "diverged")
        else:
            metrics = task_metrics(record)
    if metrics is None and failed is None and (path / "failed.json").is_file():
        failed = str(_read_json(path / "failed.json").get("error", "failed"))
    return Run(
        path=path,
        params=params,
        metrics=metrics,
        history=_read_history(path),
        eval_only=eval_only,
        failed=failed,
        tag=str(tag) if tag is not None else None,
    )


def task_metrics(record: Mapping[str, Any]) -> dict[str, Any]:
    """`{"instruct_rouge1": .., "math_exact_match": ..}` -> `{"instruct/rouge1": .., ...}`;
    keys that name no metric (name, seed, seconds, ...) are left out."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        for metric in METRIC_KEYS:
            task = key.removesuffix(f"_{metric}")
            if task != key and task:
                out[f"{task}/{metric}"] = value
                break
    return out


def metric_keys(metrics: Iterable[Mapping[str, Any]]) -> list[str]:
    """Metric keys present in any of `metrics`: the plain ones first (in METRIC_KEYS order),
    then `task/metric` ones by task (in order of appearance), each in METRIC_KEYS order."""
    seen: list[str] = []
    for m in metrics:
        seen.extend(k for k in m if k not in seen)
    tasks = list(dict.fromkeys(k.split("/")[0] for k in seen if "/" in k))
    ordered = [k for k in METRIC_KEYS if k in seen]
    ordered += [f"{t}/{k}" for t in tasks for k in METRIC_KEYS if f"{t}/{k}" in seen]
    return ordered


def metric_title(key: str) -> str:
    """`rouge1` -> `ROUGE-1`; `math/exact_match` -> `math exact match`."""
    task, _, metric = key.rpartition("/")
    title = METRIC_TITLES.get(metric, metric)
    if task and metric == "exact_match":
        title = "exact match"
    return f"{task} {title}" if task else title


RUN_MARKERS: tuple[str, ...] = (
    "eval.json", "metrics.json", "failed.json", "final", "history.jsonl", "trainer_state.json",
    TASK_SCORES_FILE, *CONFIG_FILES,
)  # fmt: skip


def _looks_like_run(path: Path) -> bool:
    return any((path / n).exists() for n in RUN_MARKERS)


def discover_runs(paths: Iterable[str | Path]) -> list[Run]:
    """Runs at the given paths; a directory that is not a run contributes its run subdirs."""
    runs: list[Run] = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise DataError(f"{p} is not a directory; pass run directories or a sweep directory.")
        if _looks_like_run(p):
            runs.append(load_run(p))
            continue
        subs = sorted(d for d in p.iterdir() if d.is_dir() and _looks_like_run(d))
        if not subs:  # one level deeper: e.g. runs/exp/<name>/seed-<s>/
            subs = sorted(
                g
                for d in p.iterdir()
                if d.is_dir()
                for g in d.iterdir()
                if g.is_dir() and _looks_like_run(g)
            )
        if not subs:
            raise DataError(
                f"{p} holds no runs (no eval.json, metrics.json, scores.json, final/, "
                "history.jsonl or config, nor subdirectories that hold them); pass the directories that `deltakd train`, `deltakd sweep` or "
                "`deltakd eval --out` wrote."
            )
        runs.extend(load_run(d) for d in subs)
    return runs


def _sort_key(value: Any) -> tuple[int, float, str]:
    if isinstance(value, bool) or value is None:
        return (1, 0.0, str(value))
    if isinstance(value, (int, float)):
        return (0, float(value), "")
    return (1, 0.0, str(value))


def _ident(value: Any) -> str:
    """Identity of a config value for grouping: 1 and 1.0 (YAML int vs float) are one value."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return repr(float(value))
    return repr(value)


def grouping_keys(runs: Sequence[Run]) -> list[str]:
    """Config fields that take more than one value across the runs (seed excluded)."""
    keys = sorted({k for r in runs for k in r.params} - NON_GROUPING)
    return [k for k in keys if len({_ident(r.params.get(k)) for r in runs}) > 1]


def _label(params: Mapping[str, Any]) -> str:
    # None = the field does not apply to this run (e.g. `alpha` of an eval-only directory).
    return ", ".join(f"{k}={v}" for k, v in params.items() if v is not None) or "all runs"


def group_label(params: Mapping[str, Any], members: Sequence[Run]) -> str:
    """The runs' common tag (the name a script gave them) if they share one, else the params."""
    tags = {r.tag for r in members}
    if len(tags) == 1 and None not in tags:
        return str(next(iter(tags)))
    return _label(params)


def group_runs(runs: Sequence[Run]) -> list[tuple[dict[str, Any], list[Run]]]:
    """[(group params, runs)]: eval-only directories first (one group per model), then the
    trained runs grouped by the config fields that vary among them, sorted by value."""
    reference: dict[str, tuple[dict[str, Any], list[Run]]] = {}
    for r in runs:
        if r.eval_only:
            model = str(r.params["model"])
            reference.setdefault(model, ({"model": model}, []))[1].append(r)
    trained = [r for r in runs if not r.eval_only]
    keys = grouping_keys(trained)
    groups: dict[tuple[str, ...], tuple[dict[str, Any], list[Run]]] = {}
    for r in trained:
        params = {k: r.params.get(k) for k in keys}
        ident = tuple(_ident(params[k]) for k in keys)
        groups.setdefault(ident, (params, []))[1].append(r)
    ordered = sorted(groups.values(), key=lambda g: [_sort_key(g[0][k]) for k in keys])
    return [reference[m] for m in sorted(reference)] + ordered


def _stats(values: list[float]) -> dict[str, Any]:
    mean, std = mean_std(values)
    # One seed has no spread to report: null, not a reassuring 0.
    return {
        "mean": mean,
        "std": std if len(values) > 1 else None,
        "n": len(values),
        "values": values,
    }


def summarise(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """One JSON-able dict per group: params, run names, seeds and mean/std/values per metric."""
    out = []
    for params, members in group_runs(runs):
        scored = [r for r in members if r.metrics is not None]
        entry: dict[str, Any] = {
            "label": group_label(params, members),
            "params": params,
            "runs": [str(r.path) for r in members],
            "seeds": [r.params.get("seed") for r in scored],
            "diverged": sum(r.failed is not None for r in members),
            "metrics": {},
        }
        for key in metric_keys(r.metrics for r in scored):
            vals = [float(r.metrics[key]) for r in scored if r.metrics.get(key) is not None]
            if vals:
                entry["metrics"][key] = _stats(vals)
        finals = [v[-1] for r in members if (v := r.series(LOSS_KEYS)[1])]
        if finals:
            entry["metrics"]["final_loss"] = _stats(finals)
        peaks = [max(v) for r in members if (v := r.series(GRAD_KEYS)[1])]
        if peaks:
            entry["metrics"]["max_grad_norm"] = _stats(peaks)
        out.append(entry)
    return out


def _pm(stat: Mapping[str, Any] | None, scale: float = 1.0, digits: int = 2) -> str:
    if stat is None:
        return "–"
    mean = stat["mean"] * scale
    if not math.isfinite(mean):
        return str(mean)
    if stat["std"] is None:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


def markdown_table(groups: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table: one row per group; ROUGE and exact match ×100, mean ± std over seeds."""
    present = metric_keys(g["metrics"] for g in groups)
    extra = [k for k in ("final_loss", "max_grad_norm") if any(k in g["metrics"] for g in groups)]
    head = ["run group", "seeds", *(metric_title(k) for k in present)]
    head += [{"final_loss": "final loss", "max_grad_norm": "max grad norm"}[k] for k in extra]
    diverged = any(g.get("diverged") for g in groups)
    if diverged:
        head.append("diverged runs")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        n = max((g["metrics"][k]["n"] for k in present if k in g["metrics"]), default=0)
        cells = [g["label"], str(n)]
        cells += [_pm(g["metrics"].get(k), 100.0) for k in present]
        cells += [_pm(g["metrics"].get(k), 1.0, 3) for k in extra]
        if diverged:
            cells.append(str(g.get("diverged", 0)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mean_curve(runs: Sequence[Run], keys: Sequence[str]) -> tuple[Any, Any, Any, Any] | None:
    """(steps, mean, lo, hi) over the runs at the steps they all logged; None if none."""
    import numpy as np

    series = [r.series(keys) for r in runs]
    series = [s for s in series if s[0]]
    if not series:
        return None
    common = set(series[0][0])
    for steps, _ in series[1:]:
        common &= set(steps)
    steps_sorted = sorted(common)
    if not steps_sorted:
        steps_sorted = series[0][0]
        series = series[:1]
    table = np.array([[dict(zip(s, v))[t] for t in steps_sorted] for s, v in series])
    return np.array(steps_sorted), table.mean(0), table.min(0), table.max(0)


def save_png(fig: Any, path: Path, *, dpi: int = 100) -> None:
    """Write `fig` as a palette PNG and close it. Line plots use few colours, so 256 of them
    lose nothing visible and the file is a few times smaller than matplotlib's RGBA PNG (small
    enough to commit next to the docs)."""
    import io

    import matplotlib.pyplot as plt
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, dpi=dpi, format="png")
    plt.close(fig)
    buf.seek(0)
    with Image.open(buf) as img:
        img.convert("RGB").quantize(colors=256).save(path, optimize=True)


def _plot_curves(
    groups: Sequence[tuple[dict[str, Any], list[Run]]],
    keys: Sequence[str],
    ylabel: str,
    title: str,
    path: Path,
    *,
    log_y: bool = False,
) -> bool:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = 0
    for params, members in groups:
        curve = _mean_curve(members, keys)
        if curve is None:
            continue
        steps, mean, lo, hi = curve
        (line,) = ax.plot(steps, mean, label=group_label(params, members))
        if len(members) > 1:
            ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
        drawn += 1
    if not drawn:
        plt.close(fig)
        return False
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    save_png(fig, path)
    return True


def _plot_alpha(runs: Sequence[Run], path: Path) -> bool:
    """ROUGE-1 (×100, mean ± std over seeds) against α, one line per other setting and, for
    per-task scores, per task."""
    import matplotlib.pyplot as plt

    scored = [r for r in runs if r.metrics and not r.eval_only and "alpha" in r.params]
    if len({_ident(r.params["alpha"]) for r in scored}) < 2:
        return False
    others = [k for k in grouping_keys(scored) if k != "alpha"]
    keys = [k for k in metric_keys(r.metrics for r in scored) if k.split("/")[-1] == "rouge1"]
    lines: dict[str, dict[float, list[float]]] = {}
    for r in scored:
        setting = _label({k: r.params.get(k) for k in others})
        for key in keys:
            if r.metrics.get(key) is None:
                continue
            task = key.rpartition("/")[0]
            label = ", ".join(x for x in (task, "" if setting == "all runs" else setting) if x)
            lines.setdefault(label or setting, {}).setdefault(float(r.params["alpha"]), []).append(
                100.0 * float(r.metrics[key])
            )
    if not lines:
        return False
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for label, by_alpha in sorted(lines.items()):
        alphas = sorted(by_alpha)
        stats = [mean_std(by_alpha[a]) for a in alphas]
        ax.errorbar(
            alphas, [s[0] for s in stats], yerr=[s[1] for s in stats], marker="o", capsize=3,
            label=label,
        )  # fmt: skip
    ax.set_xlabel("α (Delta-KD shift weight)")
    ax.set_ylabel("ROUGE-1 F1 ×100 (mean ± std over seeds)")
    ax.set_title("ROUGE-1 against α")
    ax.grid(alpha=0.3)
    if len(lines) > 1 or next(iter(lines)) != "all runs":
        ax.legend(fontsize="small")
    fig.tight_layout()
    save_png(fig, path)
    return True


def _draw_plots(
    runs: Sequence[Run], grouped: Sequence[tuple[dict[str, Any], list[Run]]], out: Path
) -> list[str]:
    """Draw every plot the runs have data for; returns the written paths."""
    drawn: list[str] = []
    if _plot_alpha(runs, out / "rouge1_vs_alpha.png"):
        drawn.append(str(out / "rouge1_vs_alpha.png"))
    if _plot_curves(grouped, LOSS_KEYS, "training loss", "Training loss (mean, min–max over seeds)",
                    out / "training_loss.png"):  # fmt: skip
        drawn.append(str(out / "training_loss.png"))
    # Gradient norms on a log axis: the parallelogram variants that put the gradient inside
    # the shift grow by orders of magnitude, and every other group is drawn beside them.
    if _plot_curves(grouped, GRAD_KEYS, "gradient norm (log scale)",
                    "Gradient norm (mean, min–max over seeds)", out / "grad_norm.png",
                    log_y=True):  # fmt: skip
        drawn.append(str(out / "grad_norm.png"))
    return drawn


def build_report(
    run_dirs: Iterable[str | Path], out_dir: str | Path = "report", *, plots: bool = True
) -> Report:
    """Write `report.md`, `report.json` and (unless `plots=False`) PNG plots under out_dir."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display

    runs = discover_runs(run_dirs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups = summarise(runs)
    drawn = _draw_plots(runs, group_runs(runs), out) if plots else []

    scored = sum(r.metrics is not None for r in runs)
    diverged = sum(r.failed is not None for r in runs)
    md = [
        "# deltakd report",
        "",
        f"{len(runs)} run(s), {scored} with eval results, {diverged} diverged, in "
        f"{len(groups)} group(s). "
        "ROUGE-1/2/L F1 and exact match ×100; mean ± sample std (ddof=1) over seeds "
        "(a lone value is one seed).",
        "",
        markdown_table(groups),
        "",
    ]
    md += [f"![{Path(p).stem}]({Path(p).name})" for p in drawn]
    markdown = "\n".join(md).rstrip() + "\n"
    (out / "report.md").write_text(markdown, encoding="utf-8")
    (out / "report.json").write_text(
        json.dumps({"groups": groups, "plots": drawn}, indent=2, default=str) + "\n",
        encoding="utf-8",
    )
    return Report(markdown=markdown, groups=groups, plots=drawn)
