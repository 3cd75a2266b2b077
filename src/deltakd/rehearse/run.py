"""`deltakd rehearse run DIR`: the shipped 7B→1.5B configs at real shapes, offline, on CPU.

Every row is the ordinary command line a user runs (`torchrun ... -m deltakd.cli train CONFIG
key=value ...`, `deltakd cache build`, `deltakd eval`) with `HF_HOME=DIR HF_HUB_OFFLINE=1`, so
the configs resolve `Qwen/Qwen2.5-7B` and `HuggingFaceH4/ultrachat_200k` through
`from_pretrained` / `load_dataset` unchanged. The configs are used as shipped except for the
overrides in `CPU_OVERRIDES` (each with the measured reason) and `max_steps`.

One table comes out: run, status, processes, seconds per step, peak RSS of each process
(anonymous + file-backed; the frozen models' bf16 weights are file-backed pages when they
stay memory-mapped), tokens per step.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deltakd.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[3] / "configs"
ULTRACHAT_CONFIG = "qwen2.5-7b-to-1.5b-ultrachat.yaml"
OPENMATH_CONFIG = "qwen2.5-7b-to-1.5b-openmath.yaml"

#: What the CPU rehearsal changes in the shipped configs, and why (figures from
#: `deltakd rehearse run` on a 2-core, 24 GiB machine; see docs/USAGE.md).
CPU_OVERRIDES: dict[str, tuple[str, str]] = {
    "per_device_batch_size": ("1", "one 1.2k-token row takes ~100 s per step on one CPU core"),
    "gradient_accumulation_steps": ("1", "same: 32 rows per step would be an hour per step"),
    "max_length": ("512", "same; rows are cut to 512 tokens (truncation=truncate) to fit 20 min"),
    "truncation": ("truncate", "with max_length=512 every realistic row would be dropped"),
    "max_prompt_length": ("256", "must stay below max_length"),
    "device": ("cpu", "no GPU"),
    "precision": ("bf16", "as shipped (CPU autocast)"),
    "logging_steps": ("1", "a log line per step, for the table"),
    "save_steps": ("0", "only the final checkpoint"),
    "progress": ("false", "no progress bars in the captured logs"),
}


@dataclass
class Row:
    """One line of the table: a command (or several run in order) and where it writes.

    `train` (config, overrides) rows are launched with as many processes (up to `nproc`) as
    the memory free at that moment holds at `need_gb` each; the table says when fewer ran.
    """

    name: str
    commands: list[list[str]]
    nproc: int
    output_dir: Path | None = None
    steps: int = 0
    note: str = ""
    need_gb: tuple[float, float] = (0.0, 0.0)  # (shared once, per process), see NEED_GB
    servers: int = 0  # teacher server processes the row launches (reported beside the ranks)
    train: tuple[Path, dict[str, str]] | None = None


@dataclass
class Result:
    name: str
    status: str
    nproc: int
    seconds: float
    s_per_step: float | None = None
    peak_rss_gb: list[float] = field(default_factory=list)  # per process, anon + file
    peak_anon_gb: list[float] = field(default_factory=list)
    tokens_per_step: float | None = None
    note: str = ""
    log: str = ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _status_kb(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "PPid"):
                    out[key] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return out


def _children(root: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            ppid = _status_kb(int(entry)).get("PPid")
            if ppid is not None:
                parents[int(entry)] = ppid
    found, frontier = [], [root]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        found += kids
        frontier += kids
    return found


class MemoryWatch:
    """Peak RSS (and its anonymous part) of every process under a root pid, polled."""

    def __init__(self, root: int, interval: float = 0.5) -> None:
        self.root, self.interval = root, interval
        self.peak: dict[int, tuple[int, int]] = {}
        self.launcher: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in [self.root, *_children(self.root)]:
                st = _status_kb(pid)
                if "VmRSS" not in st:
                    continue
                rss, anon = st["VmRSS"], st.get("RssAnon", 0)
                old = self.peak.get(pid, (0, 0))
                self.peak[pid] = (max(old[0], rss), max(old[1], anon))
            self._stop.wait(self.interval)

    def stop(self, workers_only: bool) -> tuple[list[float], list[float]]:
        self._stop.set()
        self._thread.join()
        # Under torchrun the root is the launcher; its workers are the processes to report.
        pids = [p for p in self.peak if not (workers_only and p == self.root)]
        big = sorted(pids, key=lambda p: -self.peak[p][0])
        big = [p for p in big if self.peak[p][0] > 200_000]  # skip helper shells, compilers
        return ([round(self.peak[p][0] / 2**20, 2) for p in big],
                [round(self.peak[p][1] / 2**20, 2) for p in big])  # fmt: skip


def _train_cmd(config: Path, overrides: dict[str, str], nproc: int) -> list[str]:
    args = [f"{k}={v}" for k, v in overrides.items()]
    if nproc == 1:
        return [sys.executable, "-m", "deltakd.cli", "train", str(config), *args]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            f"--master_port={_free_port()}", "-m", "deltakd.cli", "train", str(config),
            *args]  # fmt: skip


def _overrides(out: Path, steps: int, extra: dict[str, Any] | None = None) -> dict[str, str]:
    o = {k: v for k, (v, _) in CPU_OVERRIDES.items()}
    o.update(max_steps=str(steps), output_dir=str(out))
    o.update({k: str(v) for k, v in (extra or {}).items()})
    return o


def _mem_available_gb() -> float:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return 0.0


#: Memory of a training row at these shapes, GiB, as (shared once, per process): the frozen
#: models' bf16 weights stay memory-mapped from their safetensors files, so every process of
#: the row reads the same page-cache pages (file-backed RSS, counted once), while the student
#: (fp32 weights, gradients, AdamW moments) and activations are each process's own (anonymous
#: RSS). Figures from `deltakd rehearse run` on the 2-core, 24 GiB machine, rounded up:
#: delta_kd / on_policy with `references: local` (three frozen models), kd / minillm / seqkd (one
#: frozen 7B-shape model; minillm more, below), a student alone (training from the cache or from teacher servers;
#: the servers' own processes hold the frozen models once per node).
NEED_GB: dict[str, tuple[float, float]] = {
    "local": (3.8, 6.8),
    "teacher": (2.6, 6.8),
    "student": (0.3, 7.6),
    "servers": (6.2, 6.0),
    # MiniLLM with two ranks: one peaked at 9.8 GiB, all anonymous, and the other was
    # OOM-killed at 10 GiB free (alone: 8.2 GiB, 6.5 anonymous).
    "minillm": (2.6, 10.4),
}


def plan(root: Path, out: Path, *, quick: bool, nproc: int, steps: int,
         families: Sequence[str] = ("qwen",), rows: Sequence[str] | None = None
         ) -> list[Row]:  # fmt: skip
    """The rows to run. Quick: delta_kd local for each family, 1 process, 2 steps."""
    from deltakd.rehearse.shapes import FAMILIES

    uc, om = CONFIGS / ULTRACHAT_CONFIG, CONFIGS / OPENMATH_CONFIG
    plan_: list[Row] = []
    if quick:
        for fam in families:
            extra = {} if fam == "qwen" else dict(FAMILIES[fam])
            o = out / f"quick-{fam}"
            ov = _overrides(o, steps, {"max_length": 256, "max_prompt_length": 128, **extra})
            plan_.append(Row(f"delta_kd local ({fam}, ultrachat)", [], 1, o, steps,
                             need_gb=NEED_GB["local"], train=(uc, ov)))  # fmt: skip
        return plan_

    gen = {"max_new_tokens": 16}
    o = out / "delta_kd_local"
    plan_.append(Row("delta_kd local (ultrachat)", [], nproc, o, steps, need_gb=NEED_GB["local"],
                     train=(uc, _overrides(o, steps))))  # fmt: skip
    cache_dir = out / "target_cache"
    o = out / "delta_kd_cache"
    # The cache is built over the whole training set while training runs `steps` steps: 16
    # rows (a figure: 96 rows of 512 tokens through three 7B-shape models took over 12 min on
    # a shared 2-core machine).
    ov = _overrides(o, steps, {"references": "cache", "cache.dir": cache_dir, "limit": 16})
    build = [sys.executable, "-m", "deltakd.cli", "cache", "build", str(om),
             *[f"{k}={v}" for k, v in ov.items()], "--overwrite"]  # fmt: skip
    plan_.append(Row("delta_kd cache: build (openmath)", [build], 1, None, 0))
    plan_.append(Row("delta_kd cache: train (openmath)", [], nproc, o, steps,
                     need_gb=NEED_GB["student"], train=(om, ov)))  # fmt: skip
    for method, extra, need in (
        ("kd", {"method": "kd"}, "teacher"),
        # The teacher answers every training prompt before step 1: 16 rows (a figure: no
        # 64-prompt chunk of the 192 came out in 7 min on the shared 2-core machine).
        # Random weights never emit the stop token, so every reply hits max_new_tokens, and
        # seqkd drops capped replies by default (it refuses a run left with none).
        (
            "seqkd",
            {"method": "seqkd", "limit": 16, "method_args.keep_truncated": "true", **gen},
            "teacher",
        ),
        ("on_policy", {"on_policy_ratio": 1.0, **gen}, "local"),
        # The shipped configs' fused_loss: true is set aside by minillm itself (one log line).
        ("minillm", {"method": "minillm", **gen}, "minillm"),
        # One set of teacher servers per node (bf16 hidden states; the trainer applies each
        # role's lm_head chunk by chunk with the configs' fused_loss), shared by both ranks.
        (
            "delta_kd servers",
            {
                "references": "servers",
                "servers.placement": "shared",
                "servers.output": "hidden",
                "servers.threads": 1,
            },
            "servers",
        ),
    ):
        o = out / method
        plan_.append(Row(f"{method} (ultrachat)", [], nproc, o, steps, need_gb=NEED_GB[need],
                         train=(uc, _overrides(o, steps, extra)),
                         servers=3 if need == "servers" else 0))  # fmt: skip
    evaluate = [sys.executable, "-m", "deltakd.cli", "eval", "--model",
                str(out / "delta_kd_cache" / "final"), "--data",
                "openmath:nvidia/OpenMathReasoning", "--split", "cot", "--limit", "4",
                "--max-new-tokens", "16", "--device", "cpu", "--out", str(out / "eval"),
                "--json"]  # fmt: skip
    plan_.append(Row("eval exact match (openmath cot)", [evaluate], 1, None, 0))
    if rows:
        plan_ = [r for r in plan_ if any(r.name.startswith(x) for x in rows)]
    return plan_


def _launch_width(row: Row) -> None:
    """Fix a training row's process count from the memory free now, and its command."""
    if row.train is None:
        return
    free = _mem_available_gb()
    shared, each = row.need_gb
    fits = max(1, min(row.nproc, int((free - shared) // each))) if each else row.nproc
    if fits < row.nproc:
        row.note = (f"{fits} of {row.nproc} processes: {shared} GiB shared + {each} GiB each, "
                    f"{free:.0f} GiB free")  # fmt: skip
        row.nproc = fits
    row.commands = [_train_cmd(row.train[0], row.train[1], row.nproc)]


def _figures(row: Row, res: Result) -> None:
    if row.output_dir is None:
        return
    hist = row.output_dir / "history.jsonl"
    if hist.is_file():
        lines = [json.loads(x) for x in hist.read_text().splitlines() if x.strip()]
        summary = next((h for h in reversed(lines) if "train_runtime" in h), None)
        if summary and row.steps:
            res.s_per_step = round(float(summary["train_runtime"]) / row.steps, 1)
    stats = row.output_dir / "data_stats.json"
    if stats.is_file():
        s = json.loads(stats.read_text())
        if s.get("kept"):
            cfg = {k: int(v) for k, v in (("bs", CPU_OVERRIDES["per_device_batch_size"][0]),
                                           ("ga", CPU_OVERRIDES["gradient_accumulation_steps"][0]))}  # fmt: skip
            res.tokens_per_step = round(s["tokens"] / s["kept"] * cfg["bs"] * cfg["ga"] * row.nproc)


def run_row(row: Row, env: dict[str, str], log_dir: Path, timeout: float) -> Result:
    _launch_width(row)
    log = log_dir / (re.sub(r"[^a-z0-9]+", "_", row.name.lower()).strip("_") + ".log")
    # The machine's cores split between the row's processes.
    env = {**env, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // max(row.nproc, 1)))}
    t0 = time.perf_counter()
    status = "ok"
    peaks: list[float] = []
    anons: list[float] = []
    with open(log, "a") as fh:
        for cmd in row.commands:
            fh.write("$ " + " ".join(cmd) + "\n")
            fh.flush()
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
            watch = MemoryWatch(proc.pid)
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = -9
            p, a = watch.stop(workers_only="torch.distributed.run" in cmd)
            peaks += p
            anons += a
            if rc != 0:
                status = f"failed (exit {rc})"
                break
    res = Result(row.name, status, row.nproc, round(time.perf_counter() - t0, 1),
                 peak_rss_gb=peaks[: max(row.nproc, 1) + row.servers],
                 peak_anon_gb=anons[: max(row.nproc, 1) + row.servers],
                 note=row.note, log=str(log))  # fmt: skip
    _figures(row, res)
    return res


def table(results: Sequence[Result]) -> str:
    head = ("| run | status | processes | s/step | peak RSS per process, GiB (anon) "
            "| tokens/step | wall s |")  # fmt: skip
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in results:
        rss = ", ".join(f"{p:.1f} ({a:.1f})" for p, a in zip(r.peak_rss_gb, r.peak_anon_gb))
        note = f" — {r.note}" if r.note else ""
        lines.append(
            f"| {r.name} | {r.status}{note} | {r.nproc} | "
            f"{r.s_per_step if r.s_per_step is not None else '–'} | {rss or '–'} | "
            f"{r.tokens_per_step if r.tokens_per_step is not None else '–'} | {r.seconds:.0f} |"
        )
    return "\n".join(lines)


def rehearse(
    root: str | Path,
    *,
    quick: bool = False,
    nproc: int = 2,
    steps: int = 2,
    families: Sequence[str] = ("qwen",),
    rows: Sequence[str] | None = None,
    out: str | Path | None = None,
    timeout: float = 1500,
    log: Callable[[str], None] = print,
) -> list[Result]:
    """Run the rehearsal against the world in `root`; returns one Result per row."""
    root = Path(root)
    if not (root / "rehearsal.json").is_file():
        raise ConfigError(
            f"{root} holds no rehearsal world (no rehearsal.json): run "
            f"`deltakd rehearse build {root}` first."
        )
    out = Path(out) if out is not None else root / "runs"
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HOME": str(root.resolve()), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    src = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)
    results = []
    for row in plan(root, out, quick=quick, nproc=nproc, steps=steps, families=families,
                    rows=rows):  # fmt: skip
        log(f"rehearse: {row.name} ...")
        res = run_row(row, env, out, timeout)
        log(f"rehearse: {row.name}: {res.status} in {res.seconds:.0f} s (log {res.log})")
        results.append(res)
    text = table(results)
    (out / "rehearsal.md").write_text(text + "\n")
    (out / "rehearsal.json").write_text(json.dumps([r.__dict__ for r in results], indent=1))
    log(text)
    return results
