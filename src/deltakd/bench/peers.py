"""`deltakd bench loss --peers`: deltakd's KD losses beside the implementations users would pick.

Single-teacher generalized JSD (β = 0.5 by default, τ = 1) computed from the last hidden states
`[N, H]` and lm_head weights `[V, H]` of a student and a teacher, forward + backward:

- ``naive``:          full logits `[N, V]` for both, log-softmax, JSD, mean over positions;
- ``trl``:            full logits, then TRL's `GKDTrainer.generalized_jsd_loss` (batchmean);
- ``liger``:          Liger-Kernel's `LigerFusedLinearJSDLoss` (its chunked PyTorch path, the
                      one that runs without a GPU) with `torch.compile` (Liger's default);
- ``liger_eager``:    the same with `compiled=False`;
- ``kd_chunked``:     full logits, then `deltakd.losses.kd_loss(..., chunk_size=C)`;
- ``fused``:          `deltakd.losses.fused_distill_loss` straight from the hidden states;
- ``matmul``:         the four N×H×V matmuls this case cannot avoid (two forward logits, the
                      student's two backward products), timed alone: the floor.

And the Delta-KD case (three frozen references + the student, forward KL, α = 1), which no
peer supports: ``delta_naive`` (four full logits + `delta_kd_loss`), ``delta_fused``
(`fused_distill_loss`) and ``delta_matmul`` (its six matmuls).

Conventions: TRL, Liger and deltakd all define the generalized JSD as
`β·KL(T ‖ M) + (1 − β)·KL(S ‖ M)` with `M = β·T + (1 − β)·S` (T teacher, S student) and divide
the logits of both by τ with no τ² factor; every row should therefore print the same loss.
Liger's module adds a hard (cross-entropy) term: it is weighted 0 here (`weight_hard_loss=0`,
`weight_soft_loss=1`) but still computed, as it would be in a run that uses the module. Liger's
soft loss is summed and divided by the number of positions, TRL's `batchmean` of 2-D logits
likewise: both are means over positions, as deltakd's.

Each implementation runs in its own Python process (`python -m deltakd.bench.peers --worker
NAME ...`), on inputs drawn from the same seed; one warm-up call (Liger compiles there), then
`--repeats` timed calls, the median reported. Memory: peak resident set minus the resident set
once the inputs exist and the warm-up is done (`deltakd.bench.loss.PeakRSS`); gradients are
cleared before each call, so they count as extra memory for every row alike.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

JSD_METHODS: tuple[str, ...] = ("matmul", "naive", "trl", "liger", "liger_eager", "kd_chunked",
                                "fused")  # fmt: skip
DELTA_METHODS: tuple[str, ...] = ("delta_matmul", "delta_naive", "delta_fused")
METHODS: tuple[str, ...] = JSD_METHODS + DELTA_METHODS
#: method -> (import name, pip requirement) of the peer it needs
PEERS: dict[str, tuple[str, str]] = {
    "trl": ("trl", "pip install 'trl>=0.20,<2'"),
    "liger": (
        "liger_kernel",
        "pip install --no-deps 'liger-kernel>=0.6,<0.9' (without a GPU: "
        "its triton requirement is not needed by the chunked losses)",
    ),
    "liger_eager": ("liger_kernel", "pip install --no-deps 'liger-kernel>=0.6,<0.9'"),
}
#: N×H×V matmuls each case needs: two forward logits + two backward products (JSD); four
#: forward logits + two backward products (Delta-KD)
MATMULS = {"jsd": 4, "delta": 6}
DELTA_ROLES: tuple[str, ...] = ("student", "teacher_ft", "teacher_raw", "student_raw")
PEER_DEFAULTS = {"n": 256, "vocab": 32768, "hidden": 512, "chunk": 64}


def missing_peers(methods: list[str] | tuple[str, ...]) -> dict[str, str]:
    """method -> a line naming the package it needs and how to install it, for every method
    whose peer cannot be imported here."""
    out = {}
    for m in methods:
        if m in PEERS:
            module, req = PEERS[m]
            if importlib.util.find_spec(module) is None:
                out[m] = (f"{m}: the Python package {module!r} is not installed; install it "
                          f"with the bench extra (pip install 'deltakd[bench]') or: {req}")  # fmt: skip
    return out


# --------------------------------------------------------------------------- one worker


def _inputs(roles: tuple[str, ...], n: int, vocab: int, hidden: int, seed: int):
    """Hidden states (N, H) and lm_head weights (V, H) per role, float32, seeded; logits of
    std ≈ 2 (an LM head's realistic spread)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    hid, heads = {}, {}
    for role in roles:
        hid[role] = torch.randn(n, hidden, generator=g)
        heads[role] = torch.randn(vocab, hidden, generator=g).mul_(2.0 / hidden**0.5)
    hid["student"].requires_grad_(True)
    heads["student"].requires_grad_(True)
    return hid, heads


def _naive_jsd(s_logits, t_logits, beta: float):
    import math

    import torch

    logs = torch.log_softmax(s_logits, dim=-1)  # (N, V)
    logt = torch.log_softmax(t_logits, dim=-1)  # (N, V)
    if beta <= 0.0:
        return (logt.exp() * (logt - logs)).sum(-1).mean()
    if beta >= 1.0:
        return (logs.exp() * (logs - logt)).sum(-1).mean()
    logm = torch.logaddexp(logt + math.log(beta), logs + math.log1p(-beta))
    kl_t = (logt.exp() * (logt - logm)).sum(-1)
    kl_s = (logs.exp() * (logs - logm)).sum(-1)
    return (beta * kl_t + (1 - beta) * kl_s).mean()


def _make_step(method: str, hid, heads, args: argparse.Namespace):
    """A zero-argument callable doing one forward + backward, returning the loss."""
    import torch

    hs, ws = hid["student"], heads["student"]
    beta, chunk = args.beta, args.chunk
    if method in ("matmul", "delta_matmul"):
        g = torch.Generator().manual_seed(args.seed + 1)
        grad = torch.randn(hs.shape[0], ws.shape[0], generator=g)  # (N, V) a logits gradient
        frozen = [r for r in hid if r != "student"]

        def step():
            with torch.no_grad():
                for r in ("student", *frozen):
                    hid[r] @ heads[r].t()  # (N, V)
                grad @ ws  # (N, H)
                grad.t() @ hs  # (V, H)
            return None

        return step
    if method == "liger" or method == "liger_eager":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta,
                                     temperature=1.0, compiled=method == "liger",
                                     chunk_size=chunk)  # fmt: skip
        labels = torch.randint(0, ws.shape[0], (hs.shape[0],), generator=torch.Generator())

        def step():
            return fn(hs, ws, hid["teacher"], heads["teacher"], labels)

        return step
    if method == "fused":
        from deltakd.losses.fused import fused_distill_loss

        def step():
            return fused_distill_loss(hs, ws, {"teacher_ft": (hid["teacher"], heads["teacher"])},
                                      variant=None, divergence="jsd", beta=beta,
                                      chunk_size=chunk)  # fmt: skip

        return step
    if method == "delta_fused":
        from deltakd.losses.fused import fused_distill_loss

        refs = {r: (hid[r], heads[r]) for r in DELTA_ROLES[1:]}

        def step():
            return fused_distill_loss(hs, ws, refs, chunk_size=chunk)

        return step
    if method == "delta_naive":
        from deltakd.losses import delta_kd_loss

        def step():
            with torch.no_grad():
                frozen = [hid[r] @ heads[r].t() for r in DELTA_ROLES[1:]]  # three (N, V)
            return delta_kd_loss(hs @ ws.t(), *frozen)

        return step

    def logits():
        with torch.no_grad():
            t = hid["teacher"] @ heads["teacher"].t()  # (N, V)
        return hs @ ws.t(), t

    if method == "naive":
        return lambda: _naive_jsd(*logits(), beta)
    if method == "trl":
        try:
            from trl.experimental.gkd import GKDTrainer  # TRL ≥ 0.26 keeps GKD here
        except ImportError:
            from trl import GKDTrainer

        return lambda: GKDTrainer.generalized_jsd_loss(*logits(), beta=beta, temperature=1.0)
    if method == "kd_chunked":
        from deltakd.losses import kd_loss

        return lambda: kd_loss(*logits(), divergence="jsd", beta=beta, chunk_size=chunk)
    raise ValueError(method)


def _worker(args: argparse.Namespace) -> int:
    import torch

    from deltakd.bench.loss import PeakRSS

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    torch.set_num_threads(args.threads)
    method = args.worker
    roles = DELTA_ROLES if method.startswith("delta") else ("student", "teacher")
    hid, heads = _inputs(roles, args.n, args.vocab, args.hidden, args.seed)
    step = _make_step(method, hid, heads, args)

    def call() -> float | None:
        hid["student"].grad = heads["student"].grad = None
        loss = step()
        if loss is None:
            return None
        loss.backward()
        return float(loss.detach())

    warm = time.perf_counter()
    call()  # warm-up: Liger compiles here
    warm = time.perf_counter() - warm
    probe = PeakRSS()
    times, loss = [], None
    for _ in range(args.repeats):
        start = time.perf_counter()
        loss = call()
        times.append(time.perf_counter() - start)
    peak = probe.peak()
    profile = None
    if args.profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            call()
        profile = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18,
                                            max_name_column_width=40)  # fmt: skip
    out = {
        "method": method,
        "seconds": statistics.median(times),
        "times": times,
        "warmup_seconds": warm,
        "baseline_rss_bytes": probe.baseline,
        "peak_rss_bytes": peak,
        "loss": loss,
        "threads": torch.get_num_threads(),
        "profile": profile,
    }
    if method not in ("matmul", "delta_matmul"):
        out["grad_hidden_norm"] = float(hid["student"].grad.norm())
        out["grad_head_norm"] = float(heads["student"].grad.norm())
    print(json.dumps(out), flush=True)
    return 0


# --------------------------------------------------------------------------- driver


def _sizes(args: argparse.Namespace) -> None:
    for key, value in PEER_DEFAULTS.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)


def _run_worker(method: str, args: argparse.Namespace) -> dict | str:
    cmd = [sys.executable, "-m", "deltakd.bench.peers", "--worker", method, "--n", str(args.n),
           "--vocab", str(args.vocab), "--hidden", str(args.hidden), "--chunk", str(args.chunk),
           "--beta", str(args.beta), "--seed", str(args.seed), "--threads", str(args.threads),
           "--repeats", str(args.repeats)]  # fmt: skip
    if getattr(args, "profile", False):
        cmd.append("--profile")
    env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        why = "killed (out of memory?)" if proc.returncode < 0 else f"rc={proc.returncode}"
        tail = proc.stderr.strip().splitlines()[-3:]
        return f"{method} worker failed ({why}): " + " | ".join(tail)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> int:
    _sizes(args)
    args.threads = args.threads or os.cpu_count() or 1
    args.beta = getattr(args, "beta", 0.5)
    args.repeats = getattr(args, "repeats", None) or 3
    wanted = [m.strip() for m in (args.methods or ",".join(METHODS)).split(",") if m.strip()]
    bad = [m for m in wanted if m not in METHODS]
    if bad or not wanted:
        print(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}", file=sys.stderr)
        return 2
    missing = missing_peers(wanted)
    print(f"deltakd bench loss --peers: N={args.n} V={args.vocab} H={args.hidden} "
          f"chunk={args.chunk} float32 threads={args.threads} β={args.beta} τ=1; forward+backward, "
          f"median of {args.repeats} after 1 warm-up, each implementation in its own process",
          flush=True)  # fmt: skip
    for line in missing.values():
        print(f"skipped {line}", flush=True)
    results: dict[str, dict] = {}
    failed: dict[str, str] = {}
    for method in wanted:
        if method in missing:
            continue
        print(f"running {method} ...", flush=True)
        r = _run_worker(method, args)
        if isinstance(r, str):
            print(r, file=sys.stderr, flush=True)
            failed[method] = r
        else:
            results[method] = r
            if r.get("profile"):
                print(f"torch.profiler, one more {method} call (self CPU time):\n{r['profile']}")
    _table(results, args)
    if args.json:
        keys = ("seconds", "baseline_rss_bytes", "peak_rss_bytes", "loss", "warmup_seconds")
        summary: dict = {m: {k: r[k] for k in keys} for m, r in results.items()}
        summary["config"] = {k: getattr(args, k) for k in ("n", "vocab", "hidden", "chunk",
                                                              "beta", "threads", "repeats")}  # fmt: skip
        summary["skipped"] = missing
        summary["failed"] = failed
        print(json.dumps(summary))
    return 1 if failed else 0


def _table(results: dict[str, dict], args: argparse.Namespace) -> None:
    nhv = 2.0 * args.n * args.hidden * args.vocab  # FLOPs of one N×H×V matmul
    for case, methods, base_name, floor_name in (
        ("single-teacher JSD", JSD_METHODS, "naive", "matmul"),
        ("Delta-KD (3 frozen references + student, forward KL)", DELTA_METHODS, "delta_naive",
         "delta_matmul"),
    ):  # fmt: skip
        rows = {m: results[m] for m in methods if m in results}
        if not rows:
            continue
        base, floor = rows.get(base_name), rows.get(floor_name)
        n_mm = MATMULS["delta" if floor_name.startswith("delta") else "jsd"]
        print(f"\n{case}:")
        if floor is not None:
            rate = n_mm * nhv / floor["seconds"] / 1e9
            print(
                f"  the {n_mm} N×H×V matmuls alone: {floor['seconds']:.3f} s = {rate:.1f} GFLOP/s"
            )
        print(f"  {'implementation':<14} {'seconds':>8} {'extra GiB':>10} {'time/naive':>10} "
              f"{'extra/naive':>11} {'of matmul rate':>14} {'loss':>12}")  # fmt: skip
        base_extra = base["peak_rss_bytes"] - base["baseline_rss_bytes"] if base else 0
        losses = []
        for m, r in rows.items():
            extra = r["peak_rss_bytes"] - r["baseline_rss_bytes"]
            t_ratio = f"{r['seconds'] / base['seconds']:.3f}" if base else "-"
            e_ratio = f"{extra / base_extra:.3f}" if base and base_extra > 0 else "-"
            frac = f"{floor['seconds'] / r['seconds']:.0%}" if floor else "-"
            loss = "-" if m == floor_name else f"{r['loss']:.7f}"
            if m != floor_name:
                losses.append(r["loss"])
            print(f"  {m:<14} {r['seconds']:>8.3f} {extra / 2**30:>10.3f} {t_ratio:>10} "
                  f"{e_ratio:>11} {frac:>14} {loss:>12}")  # fmt: skip
        if len(losses) > 1:
            ref = losses[0]
            spread = max(abs(x - ref) for x in losses) / max(abs(ref), 1e-30)
            verdict = "equal" if spread <= 1e-5 else "NOT EQUAL"
            print(f"  losses {verdict}: largest relative difference {spread:.1e} (≤ 1e-5 expected)")
    first = next(iter(results.values()), None)
    if first:
        from deltakd.bench.loss import PeakRSS  # noqa: F401  (documents which probe ran)

        print("memory: extra = peak RSS − RSS once the inputs exist and the warm-up ran; "
              "the machine may be shared: read the ratios, not the seconds")  # fmt: skip


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, default=None)
    parser.add_argument("--vocab", type=int, default=None)
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--chunk", type=int, default=None)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", default=None)
    parser.add_argument("--profile", action="store_true")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deltakd.bench.peers")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    add_worker_arguments(parser)
    args = parser.parse_args(argv)
    if args.worker:
        _sizes(args)
        args.threads = args.threads or os.cpu_count() or 1
        return _worker(args)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
