"""`deltakd bench loss`: Delta-KD loss forward + backward, naive vs chunked vs fused.

All three start from the same inputs — the last hidden states `[N, H]` and lm_head weights
`[V, H]` of the four models (student, teacher_ft, teacher_raw, student_raw), random with a fixed
seed — so every matmul is counted in each:

- naive:   full logits `[N, V]` for all four models, then `delta_kd_loss` unchunked, backward;
- chunked: full logits for all four, then `delta_kd_loss(..., chunk_size=C)`, backward;
- fused:   `fused_distill_loss` straight from the hidden states (chunks of C positions).

Each runs in its own Python process (`python -m deltakd.bench.loss --worker METHOD ...`), so its
memory is its own: the baseline is the resident set once the inputs exist, the peak is the
kernel's high-water mark (VmHWM) after it was reset to the baseline by writing "5" to
/proc/self/clear_refs (or, where that is not allowed, the maximum of /proc/self/statm sampled
every millisecond by a thread).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

from deltakd.bench.peers import METHODS as PEER_METHODS

METHODS: tuple[str, ...] = ("naive", "chunked", "fused")
ROLES: tuple[str, ...] = ("student", "teacher_ft", "teacher_raw", "student_raw")
#: Full [N, V] float32 arrays the naive path holds at its peak (four logits, copies of them, the
#: target, the loss's softmax intermediates, the student's logit gradient): 13.1 measured at
#: N=1280, V=151936, H=1536.
_NAIVE_NV_ARRAYS = 13.5
_DEFAULTS = {"n": 2048, "vocab": 151936, "hidden": 1536, "chunk": 256}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--peers",
        action="store_true",
        help="single-teacher JSD beside TRL and Liger-Kernel (the `bench` extra) and the Delta-KD "
        "case against naive, each as a fraction of the matmul rate (deltakd.bench.peers)",
    )
    parser.add_argument(
        "--n", type=int, default=None, help="positions N (default 2048; 256 with --peers)"
    )
    parser.add_argument(
        "--vocab",
        type=int,
        default=None,
        help="vocabulary V (default 151936, Qwen2.5; 32768 with --peers)",
    )
    parser.add_argument(
        "--hidden",
        type=int,
        default=None,
        help="hidden size H (default 1536, Qwen2.5-1.5B; 512 with --peers)",
    )
    parser.add_argument(
        "--chunk",
        type=int,
        default=None,
        help="positions per chunk for chunked and fused (default 256; 64 with --peers)",
    )
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16"), default="float32", help="inputs' dtype"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: all cores)"
    )
    parser.add_argument(
        "--no-fit",
        action="store_true",
        help="keep --n even if the naive baseline may not fit in 80%% of the available memory",
    )
    parser.add_argument(
        "--methods",
        default=None,
        help="comma-separated subset of naive,chunked,fused (default all three); with --peers "
        "of " + ",".join(PEER_METHODS),
    )
    parser.add_argument("--beta", type=float, default=0.5, help="JSD β (--peers only)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed calls per implementation (--peers only)"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="print a torch.profiler table of one more call of each implementation (--peers only)",
    )


# --------------------------------------------------------------------------- memory probes


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


class PeakRSS:
    """Peak resident memory of this process from now on.

    Resets the kernel's high-water mark to the current RSS (clear_refs "5", Linux ≥ 4.0); where
    that is refused, samples /proc/self/statm every millisecond in a thread.
    """

    def __init__(self) -> None:
        self.baseline = _status_bytes("VmRSS")
        self._sampled = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.method = "VmHWM reset via /proc/self/clear_refs"
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            if _status_bytes("VmHWM") > self.baseline + (64 << 20):
                raise OSError("VmHWM was not reset")
        except OSError:
            self.method = "RSS sampled every 1 ms from /proc/self/statm"
            page = os.sysconf("SC_PAGE_SIZE")

            def sample() -> None:
                with open("/proc/self/statm") as f:
                    while not self._stop.is_set():
                        f.seek(0)
                        self._sampled = max(self._sampled, int(f.read().split()[1]) * page)
                        time.sleep(0.001)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()

    def peak(self) -> int:
        if self._thread is None:
            return _status_bytes("VmHWM")
        self._stop.set()
        self._thread.join()
        return max(self._sampled, _status_bytes("VmRSS"))


# --------------------------------------------------------------------------- one worker


def _inputs(n: int, vocab: int, hidden: int, dtype, seed: int):
    """Hidden states (N, H) and lm_head weights (V, H) for the four roles, seeded."""
    import torch

    g = torch.Generator().manual_seed(seed)
    hid, heads = {}, {}
    for role in ROLES:
        hid[role] = torch.randn(n, hidden, generator=g).to(dtype)
        # std 2/√H: logits of std ≈ 2, a realistic spread for an LM head.
        w = torch.randn(vocab, hidden, generator=g).mul_(2.0 / hidden**0.5)
        heads[role] = w.to(dtype) if dtype != torch.float32 else w
    hid["student"].requires_grad_(True)
    heads["student"].requires_grad_(True)
    return hid, heads


def _step(method: str, hid, heads, chunk: int):
    """One forward + backward; returns the loss (float)."""

    from deltakd.losses import delta_kd_loss
    from deltakd.losses.fused import fused_distill_loss

    if method == "fused":
        refs = {r: (hid[r], heads[r]) for r in ROLES[1:]}
        loss = fused_distill_loss(hid["student"], heads["student"], refs, chunk_size=chunk)
    else:
        logits = {r: hid[r] @ heads[r].t() for r in ROLES}  # four (N, V)
        loss = delta_kd_loss(
            logits["student"],
            logits["teacher_ft"],
            logits["teacher_raw"],
            logits["student_raw"],
            chunk_size=chunk if method == "chunked" else None,
        )
    loss.backward()
    return float(loss.detach())


def _worker(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    dtype = getattr(torch, args.dtype)
    hid, heads = _inputs(args.n, args.vocab, args.hidden, dtype, args.seed)
    probe = PeakRSS()
    start = time.perf_counter()
    loss = _step(args.worker, hid, heads, args.chunk)
    seconds = time.perf_counter() - start
    peak = probe.peak()
    out = {
        "method": args.worker,
        "seconds": seconds,
        "baseline_rss_bytes": probe.baseline,
        "peak_rss_bytes": peak,
        "loss": loss,
        "grad_hidden_norm": float(hid["student"].grad.float().norm()),
        "grad_head_norm": float(heads["student"].grad.float().norm()),
        "memory_probe": probe.method,
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(out), flush=True)
    return 0


# --------------------------------------------------------------------------- driver


def _available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def naive_bytes_estimate(n: int, vocab: int, hidden: int, elem: int) -> int:
    """Rough peak of the naive worker: inputs, the head's gradient, N×V float32 arrays."""
    inputs = len(ROLES) * (vocab * hidden + n * hidden) * elem
    return int(inputs + vocab * hidden * 4 + _NAIVE_NV_ARRAYS * n * vocab * 4)


def _fit_n(n: int, vocab: int, hidden: int, elem: int) -> tuple[int, str | None]:
    """The largest N ≤ n (steps of 256) whose naive run fits in 80% of the available memory.

    The margin leaves room for whatever else runs on the machine: an out-of-memory kill could
    hit another process, not only this benchmark.
    """
    avail = _available_bytes()
    if avail is None:
        return n, None
    budget = 0.8 * avail
    fitted = n
    while fitted > 16 and naive_bytes_estimate(fitted, vocab, hidden, elem) > budget:
        fitted = fitted - 256 if fitted > 256 else fitted // 2
    if fitted == n:
        return n, None
    need = naive_bytes_estimate(n, vocab, hidden, elem)
    return fitted, (
        f"N lowered from {n} to {fitted}: the naive baseline would need about "
        f"{need / 2**30:.1f} GiB and {avail / 2**30:.1f} GiB are available (80% used at most)"
    )


def _gib(x: float) -> str:
    return f"{x / 2**30:.2f}"


def run(args: argparse.Namespace) -> int:
    if getattr(args, "worker", None):
        return _worker(args)
    if getattr(args, "peers", False):
        from deltakd.bench import peers

        return peers.run(args)
    for key, value in _DEFAULTS.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    methods = [m.strip() for m in (args.methods or ",".join(METHODS)).split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        print(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}", file=sys.stderr)
        return 2
    elem = 2 if args.dtype == "bfloat16" else 4
    fit = "naive" in methods and not args.no_fit
    n, note = _fit_n(args.n, args.vocab, args.hidden, elem) if fit else (args.n, None)
    threads = args.threads or os.cpu_count() or 1
    print(
        f"Delta-KD loss forward+backward: N={n} V={args.vocab} H={args.hidden} "
        f"chunk={args.chunk} dtype={args.dtype} threads={threads} (each method in its own process)",
        flush=True,
    )
    if note:
        print(f"note: {note}", flush=True)
    results: dict[str, dict] = {}
    for method in methods:
        print(f"running {method} ...", flush=True)
        cmd = [
            sys.executable,
            "-m",
            "deltakd.bench.loss",
            "--worker",
            method,
            "--n",
            str(n),
            "--vocab",
            str(args.vocab),
            "--hidden",
            str(args.hidden),
            "--chunk",
            str(args.chunk),
            "--dtype",
            args.dtype,
            "--seed",
            str(args.seed),
            "--threads",
            str(threads),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            why = "killed (out of memory?)" if proc.returncode < 0 else f"rc={proc.returncode}"
            print(f"{method} worker failed: {why}", file=sys.stderr)
            return 1
        results[method] = json.loads(proc.stdout.strip().splitlines()[-1])
    base = results.get("naive")
    header = (
        f"{'method':<8} {'seconds':>9} {'base GiB':>9} {'peak GiB':>9} {'extra GiB':>10} "
        f"{'time/naive':>10} {'extra/naive':>11} {'loss':>10}"
    )
    print(header)
    for method, r in results.items():
        extra = r["peak_rss_bytes"] - r["baseline_rss_bytes"]
        t_ratio = e_ratio = "-"
        if base is not None:
            base_extra = base["peak_rss_bytes"] - base["baseline_rss_bytes"]
            t_ratio = f"{r['seconds'] / base['seconds']:.3f}"
            e_ratio = f"{extra / base_extra:.3f}" if base_extra > 0 else "-"
        print(
            f"{method:<8} {r['seconds']:>9.2f} {_gib(r['baseline_rss_bytes']):>9} "
            f"{_gib(r['peak_rss_bytes']):>9} {_gib(extra):>10} {t_ratio:>10} {e_ratio:>11} "
            f"{r['loss']:>10.5f}"
        )
    if base is not None and "fused" in results:
        f = results["fused"]
        base_extra = base["peak_rss_bytes"] - base["baseline_rss_bytes"]
        f_extra = f["peak_rss_bytes"] - f["baseline_rss_bytes"]
        mem_ok = f_extra <= 0.25 * base_extra
        time_ok = f["seconds"] <= 1.1 * base["seconds"]
        print(
            f"targets (issue 8): fused extra ≤ 0.25 × naive: {'yes' if mem_ok else 'NO'}; "
            f"fused time ≤ 1.1 × naive: {'yes' if time_ok else 'NO'}"
        )
    probe = next(iter(results.values()))["memory_probe"]
    print(f"memory: {probe}; extra = peak - baseline (inputs already resident)")
    if args.json:
        keys = ("seconds", "baseline_rss_bytes", "peak_rss_bytes", "loss")
        summary = {m: {k: r[k] for k in keys} for m, r in results.items()}
        summary["config"] = {
            "n": n,
            "vocab": args.vocab,
            "hidden": args.hidden,
            "chunk": args.chunk,
            "dtype": args.dtype,
            "threads": threads,
        }
        if note:
            summary["config"]["note"] = note
        print(json.dumps(summary))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deltakd.bench.loss")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    add_arguments(parser)
    args = parser.parse_args(argv)
    for key, value in _DEFAULTS.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
