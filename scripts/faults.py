#!/usr/bin/env python
"""Fault-injection runs for deltakd: nothing is lost when processes die, hang or slow down.

Scenarios (pick with --scenarios, default all):

  crash    a `deltakd train` run (a subprocess) is SIGKILLed at K random optimizer steps and
           resumed each time (resume=auto); its final weights must equal, bit for bit, those
           of the same run never interrupted.
  save     the run SIGKILLs itself *inside* checkpoint saves, at three points in turn (after
           the weights, after the optimizer, just before the rename); each time the half-written
           `.tmp-checkpoint-N` must be ignored, the previous checkpoint must be intact, and the
           resumed run must end bit-identical to the uninterrupted one.
  servers  a `references: servers` run with `restart: true` while its teacher servers are
           SIGKILLed, hung (SIGSTOP) and slowed (SIGSTOP, then SIGCONT before the timeout); the
           final weights must equal the `references: local` run's, every server must be gone
           afterwards and no /dev/shm segment of the run may remain.
  orphan   the trainer of a `references: servers` run is SIGKILLed: its servers must exit by
           themselves, the resumed run must sweep the dead trainer's /dev/shm segments, and end
           equal to the uninterrupted run.

Everything runs on this host: servers are launched by the trainer on ipc:// sockets, nothing
binds a TCP port. Models are tiny random Qwen2 models with a BPE tokenizer trained here on
the mini world's tasks (or --world DIR / --world mini). The whole script stops at
--time-limit, marking what did not finish as failed. Prints a summary table; exit status 1
if any check failed.

Example (about 3-5 minutes on 2 busy CPU cores):

    .venv/bin/python scripts/faults.py --steps 10 --kills 3 --out /tmp/faults
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROLES = ("teacher_ft", "teacher_raw", "student_raw")
SAVE_PHASES = ("weights", "optimizer", "rename")
SCENARIOS = ("crash", "save", "servers", "orphan")


# ----------------------------------------------------------------------------------- results


@dataclass
class Check:
    scenario: str
    name: str
    ok: bool
    detail: str = ""


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)

    def add(self, scenario: str, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append(Check(scenario, name, bool(ok), detail))
        print(f"[{'PASS' if ok else 'FAIL'}] {scenario}: {name}  {detail}", flush=True)
        return bool(ok)

    def table(self) -> str:
        rows = [("scenario", "check", "result", "detail")]
        rows += [(c.scenario, c.name, "PASS" if c.ok else "FAIL", c.detail) for c in self.checks]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = []
        for i, r in enumerate(rows):
            lines.append("  ".join(r[j].ljust(widths[j]) for j in range(3)) + "  " + r[3])
            if i == 0:
                lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 6)
        return "\n".join(lines)

    @property
    def failed(self) -> int:
        return sum(not c.ok for c in self.checks)


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def check(self, what: str) -> None:
        if self.left() <= 0:
            raise TimeoutError(f"--time-limit reached during {what}")


# ----------------------------------------------------------------------------------- world


def build_tiny_world(out: Path) -> dict[str, str]:
    """A BPE tokenizer trained on the mini tasks and three random tiny Qwen2 models."""
    from deltakd.data.mini import load_task
    from deltakd.data.mini.models import ModelShape, make_model
    from deltakd.data.mini.tokenizer import train_tokenizer

    if all((out / r / "config.json").is_file() for r in ROLES):
        return {"tokenizer": str(out / "tokenizer"), **{r: str(out / r) for r in ROLES}}
    texts = [m["content"] for t in ("instruct", "math")
             for row in load_task(t, "train", limit=200) for m in row["messages"]]  # fmt: skip
    tok = train_tokenizer(texts, out / "tokenizer", vocab_size=400)
    shapes = {
        "teacher_raw": (ModelShape(hidden=48, layers=2, heads=4, kv_heads=2, intermediate=96), 1),
        "teacher_ft": (ModelShape(hidden=48, layers=2, heads=4, kv_heads=2, intermediate=96), 2),
        "student_raw": (ModelShape(hidden=32, layers=1, heads=4, kv_heads=2, intermediate=64), 3),
    }
    for role, (shape, seed) in shapes.items():
        make_model(shape, tok, seed=seed).save_pretrained(out / role)
        tok.save_pretrained(out / role)
    return {"tokenizer": str(out / "tokenizer"), **{r: str(out / r) for r in ROLES}}


def resolve_world(arg: str | None, out: Path) -> dict[str, str]:
    if arg == "mini":
        return {"tokenizer": "mini:tokenizer", **{r: f"mini:{r}" for r in ROLES}}
    if arg:
        root = Path(arg)
        missing = [r for r in (*ROLES, "tokenizer") if not (root / r).is_dir()]
        if missing:
            raise SystemExit(f"--world {root}: missing {missing}; give a directory with "
                             "tokenizer/, teacher_ft/, teacher_raw/, student_raw/ or `mini`")  # fmt: skip
        return {"tokenizer": str(root / "tokenizer"), **{r: str(root / r) for r in ROLES}}
    return build_tiny_world(out / "world")


def base_config(world: dict[str, str], args: argparse.Namespace) -> dict[str, Any]:
    return {
        "method": "delta_kd",
        "alpha": 1.0,
        "lam": 0.1,
        **world,
        "dataset": "mini:instruct",
        "limit": args.rows,
        "max_length": 96,
        "max_prompt_length": 64,
        "per_device_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "learning_rate": 3e-3,
        "lr_scheduler": "cosine",
        "warmup_steps": 1,
        "max_steps": args.steps,
        "save_steps": args.save_steps,
        "save_total_limit": 2,
        "logging_steps": 1,
        "progress": False,
        "device": "cpu",
        "precision": "fp32",
        "reference_dtype": "fp32",
        "resume": "auto",
        "seed": args.seed,
    }


# ----------------------------------------------------------------------------------- helpers


def child_env() -> dict[str, str]:
    # Same thread count in every process: float sums must happen in the same order.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}  # fmt: skip


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def start_train(cfg_path: Path, log: Path, die_in_save: str | None = None) -> subprocess.Popen:
    cmd = [sys.executable, os.path.abspath(__file__), "--child-train", str(cfg_path)]
    if die_in_save:
        cmd += ["--die-in-save", die_in_save]
    with open(log, "ab") as fh:
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=child_env(),
                                start_new_session=True)  # fmt: skip


def wait(proc: subprocess.Popen, deadline: Deadline, what: str) -> int:
    try:
        return proc.wait(timeout=max(deadline.left(), 1.0))
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        proc.wait(10)
        raise TimeoutError(f"--time-limit reached while waiting for {what}") from None


def kill_tree(pid: int) -> None:
    """SIGKILL a process started here and every process below it (its servers)."""
    for child in descendants(pid):
        _signal(child, signal.SIGKILL)
    _signal(pid, signal.SIGKILL)


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (ppid, cmdline) from /proc."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        out[int(d.name)] = (ppid, cmd)
    return out


def descendants(pid: int) -> list[int]:
    table = _proc_table()
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        kids = [p for p, (pp, _) in table.items() if pp == parent]
        found += kids
        frontier += kids
    return found


def server_pids(run_id: str, role: str | None = None) -> list[int]:
    """Live `deltakd serve` processes of this run (any parent), optionally of one role."""
    out = []
    for pid, (_, cmd) in _proc_table().items():
        if (
            " serve " in cmd
            and f"--run-id {run_id}" in cmd
            and (role is None or f"--role {role} " in cmd)
        ):
            state = _state(pid)
            if state not in ("Z", "X", None):
                out.append(pid)
    return out


def _state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2]
    except (OSError, ValueError, IndexError):
        return None


def history_lines(run_dir: Path) -> int:
    path = run_dir / "history.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def logged_step(run_dir: Path, since: int = 0) -> int:
    """The last optimizer step logged in history.jsonl after its first `since` lines."""
    path = run_dir / "history.jsonl"
    if not path.is_file():
        return 0
    step = 0
    for line in path.read_text().splitlines()[since:]:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by the kill
        if "loss" in row:
            step = max(step, int(row["step"]))
    return step


def final_weights(run_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final" / "model.safetensors"))


def compare(a: dict[str, Any], b: dict[str, Any]) -> tuple[bool, float]:
    """(bit-identical, max |a - b|)."""
    import torch

    if a.keys() != b.keys():
        return False, float("inf")
    same = all(torch.equal(a[k], b[k]) for k in a)
    diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    return same, diff


def reference_run(root: Path, cfg: dict[str, Any], deadline: Deadline, name: str) -> Path:
    run_dir = root / name
    if (run_dir / "final" / "model.safetensors").is_file():
        return run_dir  # reused between scenarios
    path = write_config(root / f"{name}.yaml", {**cfg, "output_dir": str(run_dir)})
    code = wait(start_train(path, root / f"{name}.log"), deadline, f"the {name} run")
    if code != 0:
        raise RuntimeError(f"the uninterrupted run failed (exit {code}); see {root / name}.log")
    return run_dir


# ----------------------------------------------------------------------------------- scenarios


def scenario_crash(root: Path, cfg: dict[str, Any], args, rng, report: Report, deadline) -> None:
    ref = reference_run(root, cfg, deadline, "uninterrupted")
    run_dir = root / "crash"
    path = write_config(root / "crash.yaml", {**cfg, "output_dir": str(run_dir)})
    # Each kill leaves at least one step to train, so every death costs work that must be redone.
    targets = sorted(rng.sample(range(1, args.steps - 1), min(args.kills, args.steps - 2)))
    kills, missed = [], 0
    for target in targets:
        # Steps logged by this process only: a resumed run logs the replayed steps again.
        since = history_lines(run_dir)
        proc = start_train(path, root / "crash.log")
        while logged_step(run_dir, since) < target and proc.poll() is None:
            deadline.check("the crash scenario")
            time.sleep(0.02)
        if proc.poll() is not None:
            report.add("crash", f"kill at step {target}", False,
                       f"the run exited ({proc.returncode}) before it could be killed")  # fmt: skip
            return
        time.sleep(rng.uniform(0.0, 0.15))  # somewhere inside the next step or save
        at = logged_step(run_dir, since)
        kill_tree(proc.pid)
        proc.wait(10)
        kills.append(at)
        missed += proc.returncode != -signal.SIGKILL  # it had finished before the kill
    code = wait(start_train(path, root / "crash.log"), deadline, "the resumed crash run")
    report.add("crash", f"SIGKILL after steps {kills}, resumed each time",
               code == 0 and not missed, f"{missed} kill(s) came too late; final run exit {code}")  # fmt: skip
    same, diff = compare(final_weights(ref), final_weights(run_dir))
    report.add("crash", "final weights == uninterrupted run", same,
               "bit-identical" if same else f"max |diff| {diff:.3g}")  # fmt: skip


def scenario_save(root: Path, cfg: dict[str, Any], args, rng, report: Report, deadline) -> None:
    ref = reference_run(root, cfg, deadline, "uninterrupted")
    run_dir = root / "save"
    path = write_config(root / "save.yaml", {**cfg, "output_dir": str(run_dir)})
    saves = list(range(2 * args.save_steps, args.steps, args.save_steps))
    for step, phase in zip(saves, SAVE_PHASES):
        proc = start_train(path, root / "save.log", die_in_save=f"{step}:{phase}")
        code = wait(proc, deadline, f"the run dying in save {step}")
        prev = run_dir / f"checkpoint-{step - args.save_steps}"
        ok = (code == -signal.SIGKILL and (run_dir / f".tmp-checkpoint-{step}").is_dir()
              and not (run_dir / f"checkpoint-{step}").exists()
              and (prev / "trainer_state.json").is_file()
              and (prev / "model.safetensors").is_file())  # fmt: skip
        report.add("save", f"SIGKILL in save of step {step} ({phase})", ok,
                   f"exit {code}; {prev.name} intact, .tmp-checkpoint-{step} left unused")  # fmt: skip
    code = wait(start_train(path, root / "save.log"), deadline, "the resumed save run")
    report.add("save", "resume after the last death", code == 0, f"exit {code}")
    same, diff = compare(final_weights(ref), final_weights(run_dir))
    report.add("save", "final weights == uninterrupted run", same,
               "bit-identical" if same else f"max |diff| {diff:.3g}")  # fmt: skip


class _RestartCounter(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if "restarting it" in msg:
            self.messages.append(msg)


def scenario_servers(root: Path, cfg: dict[str, Any], args, rng, report: Report, deadline) -> None:
    import torch
    from transformers import TrainerCallback

    from deltakd.references import shm
    from deltakd.train import load_config, train

    torch.set_num_threads(1)
    common = {**cfg, "resume": "never", "save_steps": 0}
    local = train(load_config(None, {**common, "output_dir": str(root / "servers-local")}))
    run_id = "faults" + os.urandom(4).hex()
    timeout = args.server_timeout
    faults = [("kill", ROLES[0]), ("hang", ROLES[1]), ("slow", ROLES[2])]
    steps = sorted(rng.sample(range(1, args.steps - 1), len(faults)))
    plan = dict(zip(steps, faults))
    done: list[str] = []

    class Inject(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            if state.global_step not in plan:
                return
            kind, role = plan[state.global_step]
            pids = server_pids(run_id, role)
            if len(pids) != 1:
                done.append(f"step {state.global_step}: found {len(pids)} {role} servers")
                return
            pid = pids[0]
            if kind == "kill":
                os.kill(pid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGSTOP)
                if kind == "slow":  # resumes before the client's timeout: no restart wanted
                    threading.Timer(timeout / 2, _signal, (pid, signal.SIGCONT)).start()
            done.append(f"{kind} {role} (pid {pid}) after step {state.global_step}")

    counter = _RestartCounter()
    logging.getLogger("deltakd.references.client").addHandler(counter)
    try:
        servers = train(load_config(None, {
            **common, "output_dir": str(root / "servers"), "references": "servers",
            "servers": {"restart": True, "max_restarts": 3, "timeout": timeout, "threads": 1,
                        "dtype": "fp32", "run_id": run_id, "start_timeout": 300},
        }), callbacks=[Inject()])  # fmt: skip
    finally:
        logging.getLogger("deltakd.references.client").removeHandler(counter)
    report.add("servers", "faults injected", len(done) == len(faults) and "found" not in
               " ".join(done), "; ".join(done))  # fmt: skip
    restarted = sorted({m.split(":")[0] for m in counter.messages})
    want = sorted(f"role {role}" for kind, role in faults if kind != "slow")
    report.add("servers", "killed and hung servers restarted, slow one not", restarted == want,
               "restarts: " + ("; ".join(m.split(" (")[0] for m in counter.messages) or "none"))  # fmt: skip
    report.add("servers", "all steps trained", servers.global_step == args.steps,
               f"{servers.global_step}/{args.steps} steps, "
               f"{servers.metrics.get('skipped_batches', 0)} batches skipped")  # fmt: skip
    same, diff = compare(final_weights(root / "servers-local"), final_weights(root / "servers"))
    report.add("servers", "final weights == references: local run", same or diff <= 1e-5,
               "bit-identical" if same else f"max |diff| {diff:.3g} (tolerance 1e-5)")  # fmt: skip
    time.sleep(0.5)
    left = server_pids(run_id)
    report.add("servers", "no server process left", not left, f"alive: {left}")
    segs = shm.segments(run_id)
    report.add("servers", f"no /dev/shm/deltakd_{run_id}_* left", not segs, f"left: {segs}")
    del local


def scenario_orphan(root: Path, cfg: dict[str, Any], args, rng, report: Report, deadline) -> None:
    from deltakd.references import shm

    run_id = "orphan" + os.urandom(4).hex()
    servers = {"restart": True, "timeout": args.server_timeout, "threads": 1, "dtype": "fp32",
               "run_id": run_id, "start_timeout": 300}  # fmt: skip
    scfg = {**cfg, "references": "servers", "servers": servers}
    ref = reference_run(root, {**scfg, "servers": {**servers, "run_id": run_id + "r"}}, deadline,
                        "orphan-uninterrupted")  # fmt: skip
    run_dir = root / "orphan"
    path = write_config(root / "orphan.yaml", {**scfg, "output_dir": str(run_dir)})
    proc = start_train(path, root / "orphan.log")
    target = rng.randrange(args.save_steps + 1, args.steps)
    while logged_step(run_dir) < target and proc.poll() is None:
        deadline.check("the orphan scenario")
        time.sleep(0.02)
    pids = server_pids(run_id)
    segs_before = shm.segments(run_id)
    _signal(proc.pid, signal.SIGKILL)  # the trainer only: its servers must notice by themselves
    proc.wait(10)
    t0 = time.monotonic()
    while server_pids(run_id) and time.monotonic() - t0 < 30:
        time.sleep(0.1)
    left = server_pids(run_id)
    report.add("orphan", f"trainer SIGKILLed after step {logged_step(run_dir)}: servers exit",
               bool(pids) and not left,
               f"{len(pids)} servers exited in {time.monotonic() - t0:.1f} s; alive: {left}")  # fmt: skip
    report.add("orphan", "precondition: the dead trainer left shm segments", bool(segs_before),
               f"{len(shm.segments(run_id))} segment(s) of the dead trainer")  # fmt: skip
    code = wait(start_train(path, root / "orphan.log"), deadline, "the resumed orphan run")
    report.add("orphan", "resume with new servers", code == 0, f"exit {code}")
    same, diff = compare(final_weights(ref), final_weights(run_dir))
    report.add("orphan", "final weights == uninterrupted servers run", same or diff <= 1e-5,
               "bit-identical" if same else f"max |diff| {diff:.3g} (tolerance 1e-5)")  # fmt: skip
    time.sleep(0.5)
    segs = shm.segments(run_id) + shm.segments(run_id + "r")
    report.add("orphan", "dead trainer's segments swept, none left", not segs, f"left: {segs}")
    left = server_pids(run_id) + server_pids(run_id + "r")
    report.add("orphan", "no server process left", not left, f"alive: {left}")
    # The killed trainer's server-log directory is kept an hour for reading, then the next run
    # sweeps it; check the sweep finds it (with no age limit) rather than wait an hour.
    from deltakd.references.client import sweep_dead_log_dirs

    stale = [p for p in sweep_dead_log_dirs(max_age_s=0) if p.name.startswith(f"deltakd-{run_id}-")]
    report.add("orphan", "dead trainer's server-log dir swept", bool(stale), f"swept {stale}")


# ----------------------------------------------------------------------------------- child


def child_train(cfg_path: str, die_in_save: str | None) -> int:
    """`deltakd train CONFIG`, optionally SIGKILLing itself at one point of one save."""
    import torch

    torch.set_num_threads(1)
    if die_in_save:
        from deltakd.train import trainer as tr

        step_s, phase = die_in_save.split(":")
        step = int(step_s)

        def die() -> None:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        if phase == "weights":  # model weights written into .tmp-checkpoint-N, optimizer not
            orig_opt = tr.DistillTrainer._save_optimizer_and_scheduler

            def opt(self, out, *a, **k):
                if self.state.global_step == step:
                    die()
                return orig_opt(self, out, *a, **k)

            tr.DistillTrainer._save_optimizer_and_scheduler = opt
        elif phase == "optimizer":  # optimizer written, RNG state and trainer_state.json not
            orig_rng = tr.DistillTrainer._save_rng_state

            def rng_state(self, out, *a, **k):
                if self.state.global_step == step:
                    die()
                return orig_rng(self, out, *a, **k)

            tr.DistillTrainer._save_rng_state = rng_state
        elif phase == "rename":  # everything written and synced except the final rename
            orig_fsync = tr._fsync_tree

            def fsync(path: str) -> None:
                orig_fsync(path)
                if os.path.basename(path) == f".tmp-checkpoint-{step}":
                    die()

            tr._fsync_tree = fsync
        else:
            raise SystemExit(f"unknown --die-in-save phase {phase!r}; use {SAVE_PHASES}")
    from deltakd.cli import main

    return main(["train", cfg_path])


# ----------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated subset of {','.join(SCENARIOS)} (default: all)",
    )
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per run (10)")
    p.add_argument("--save-steps", type=int, default=2, help="checkpoint every N steps (2)")
    p.add_argument("--kills", type=int, default=3, help="SIGKILLs in the crash scenario (3)")
    p.add_argument("--rows", type=int, default=48, help="training rows of mini:instruct (48)")
    p.add_argument(
        "--server-timeout",
        type=float,
        default=4.0,
        help="seconds before a silent server counts as hung (4)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the run and of the fault times")
    p.add_argument(
        "--world",
        default=None,
        help="model directory with tokenizer/ teacher_ft/ teacher_raw/ student_raw/, "
        "or `mini` for the shipped mini world (default: tiny random models)",
    )
    p.add_argument("--out", default=None, help="work directory (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument(
        "--time-limit",
        type=float,
        default=900,
        help="stop everything after this many seconds (900)",
    )
    p.add_argument("--child-train", default=None, help=argparse.SUPPRESS)
    p.add_argument("--die-in-save", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = set(args.scenarios.split(",")) - set(SCENARIOS)
    if unknown:
        p.error(f"unknown scenario(s) {sorted(unknown)}; choose from {', '.join(SCENARIOS)}")
    if args.save_steps < 1 or args.steps <= 4 * args.save_steps:
        p.error("--steps must be > 4 * --save-steps (the save scenario kills three saves)")
    return args  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child_train:
        return child_train(args.child_train, args.die_in_save)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    deadline = Deadline(args.time_limit)
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="deltakd-faults-"))
    root.mkdir(parents=True, exist_ok=True)
    for name in ("uninterrupted", "crash", "save", "servers", "servers-local", "orphan",
                 "orphan-uninterrupted"):  # fmt: skip
        shutil.rmtree(root / name, ignore_errors=True)  # a fresh run each time
    rng = random.Random(args.seed)
    report = Report()
    t0 = time.monotonic()
    print(f"work directory {root}", flush=True)
    world = resolve_world(args.world, root)
    cfg = base_config(world, args)
    funcs = {"crash": scenario_crash, "save": scenario_save, "servers": scenario_servers,
             "orphan": scenario_orphan}  # fmt: skip
    for name in args.scenarios.split(","):
        start = time.monotonic()
        try:
            deadline.check(name)
            funcs[name](root, cfg, args, rng, report, deadline)
        except Exception as exc:  # a scenario that breaks is a failed check, not a traceback
            report.add(name, "scenario ran to the end", False, f"{type(exc).__name__}: {exc}")
        print(f"-- {name}: {time.monotonic() - start:.0f} s", flush=True)
    print()
    print(report.table())
    print(f"\n{len(report.checks) - report.failed}/{len(report.checks)} checks passed in "
          f"{time.monotonic() - t0:.0f} s (steps={args.steps}, save_steps={args.save_steps}, "
          f"kills={args.kills}, seed={args.seed})")  # fmt: skip
    if not args.keep and not args.out:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
