"""`deltakd bench precision`: how much the Delta-KD target z* loses to 16-bit references.

z* = z_teacher_ft + α·(z_student_raw − z_teacher_raw) sums three logit vectors of magnitude
8–32; in bf16 each is rounded to 8 significant bits (up to 0.06–0.125 per logit at 16–32), and
the sum carries all three errors. This measures KL(π*_exact ‖ π*) per token, in nats, where
π* = softmax(z*/τ), for the ways a trainer can get the three logit vectors:

- ``bf16 logits, z* in bf16``:  each model's logits in bf16 (a bf16 lm_head: float32
  accumulation, bf16 output), z* summed in bf16 too;
- ``bf16 logits``:  the same logits upcast to float32 before z* is summed (what deltakd's
  losses do with 16-bit inputs, dense or fused);
- ``fp32 logits from bf16``:  logits computed in float32 from the bf16 last hidden states and
  the bf16 lm_head weights (the matmul in float32, nothing rounded after it);
- ``fp32 throughout``:  float32 hidden states, heads and logits.

The exact target is computed in float64 from the float32 hidden states and heads.

Inputs are synthetic at real shapes (the tool cannot download a checkpoint): last hidden states
of RMS 1 (what a final RMSNorm gives) and lm_head weights drawn so that each position's logits
are an offset drawn from U[8, 24] plus a random part of std 2.5 (the top logits reach ~30–35,
the magnitudes of Qwen2.5's logits); teacher_ft's head and hidden states are teacher_raw's plus
a 30 % perturbation (finetuning moves them a little), student_raw is independent with its own
hidden size. It measures the rounding of the last hidden state, the head and the logits only —
not the drift a bf16 forward pass accumulates through the layers before them, which is larger
and which no setting of the loss can undo.

Heads are drawn in vocabulary chunks from seeded generators, so memory stays at a few
(N, V) arrays whatever V and H are.
"""

from __future__ import annotations

import argparse
import json
import time

ROLES = {"teacher_ft": "teacher", "teacher_raw": "teacher", "student_raw": "student"}
SETTINGS: tuple[str, ...] = ("bf16 logits, z* in bf16", "bf16 logits", "fp32 logits from bf16",
                             "fp32 throughout")  # fmt: skip
#: the issue's bound on the target's precision loss
BOUND_NATS = 1e-3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, default=64, help="positions (default 64)")
    parser.add_argument(
        "--vocab", type=int, default=151936, help="vocabulary V (default 151936, Qwen2.5)"
    )
    parser.add_argument(
        "--teacher-hidden", type=int, default=3584, help="teachers' H (default 3584, Qwen2.5-7B)"
    )
    parser.add_argument(
        "--student-hidden", type=int, default=1536, help="student's H (default 1536, Qwen2.5-1.5B)"
    )
    parser.add_argument("--alpha", type=float, default=1.0, help="Delta-KD α")
    parser.add_argument("--temperature", type=float, default=1.0, help="τ")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument(
        "--vocab-chunk", type=int, default=8192, help="head rows drawn and multiplied at once"
    )
    parser.add_argument(
        "--cost",
        action="store_true",
        help="instead: time and peak memory of the float32 product (the default) against the "
        "models' bf16 logits, for the fused Delta-KD loss and for dense reference logits",
    )
    parser.add_argument(
        "--cost-n", type=int, default=256, help="positions of the --cost run (default 256)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per setting (--cost)")


def _hidden(n: int, h: int, gen, offsets):
    """(N, H) float32 of RMS ≈ 1 whose last coordinate carries each position's offset."""
    import torch

    x = torch.randn(n, h, generator=gen)
    x[:, -1] = offsets / 8.0  # the head's last column is 8: logit offset = offsets
    return x


def _head_chunk(role: str, v0: int, v1: int, h: int, seed: int):
    """Rows [v0, v1) of a role's (V, H) head, float32: random part of std 2.5 in the logits,
    last column 8 (carries the offset)."""
    import torch

    def draw(tag: int):
        g = torch.Generator().manual_seed(seed * 1_000_003 + tag * 7919 + v0)
        return torch.randn(v1 - v0, h, generator=g).mul_(2.5 / h**0.5)

    if role == "student_raw":
        w = draw(3)
    elif role == "teacher_raw":
        w = draw(1)
    else:  # teacher_ft: teacher_raw's head moved by 30 %
        w = draw(1).add_(draw(2), alpha=0.3)
    w[:, -1] = 8.0
    return w


def _targets(args: argparse.Namespace):
    """z* per setting: the float64 exact target and the four settings' (N, V) targets."""
    import torch

    g = torch.Generator().manual_seed(args.seed)
    n, v = args.n, args.vocab
    offsets = torch.empty(n).uniform_(8.0, 24.0, generator=g)
    h_teacher = _hidden(n, args.teacher_hidden, g, offsets)
    h_ft = h_teacher + 0.3 * torch.randn(n, args.teacher_hidden, generator=g)
    h_ft[:, -1] = h_teacher[:, -1]
    hidden = {"teacher_ft": h_ft, "teacher_raw": h_teacher,
              "student_raw": _hidden(n, args.student_hidden, g, offsets)}  # fmt: skip
    weight = {"teacher_ft": 1.0, "teacher_raw": -args.alpha, "student_raw": args.alpha}
    exact = torch.zeros(n, v, dtype=torch.float64)
    out = {s: torch.zeros(n, v, dtype=torch.float32) for s in SETTINGS}
    out[SETTINGS[0]] = torch.zeros(n, v, dtype=torch.bfloat16)
    magnitude = []
    for role, kind in ROLES.items():
        size = args.teacher_hidden if kind == "teacher" else args.student_hidden
        x = hidden[role]
        x16 = x.bfloat16().float()
        w_ = weight[role]
        for v0 in range(0, v, args.vocab_chunk):
            v1 = min(v, v0 + args.vocab_chunk)
            w = _head_chunk(role, v0, v1, size, args.seed)  # (c, H)
            z64 = x.double() @ w.double().t()  # (N, c)
            z32 = x @ w.t()
            zb = x16 @ w.bfloat16().float().t()  # float32 from bf16 inputs
            z16 = zb.bfloat16()  # a bf16 lm_head's output
            exact[:, v0:v1] += w_ * z64
            out["fp32 throughout"][:, v0:v1] += w_ * z32
            out["fp32 logits from bf16"][:, v0:v1] += w_ * zb
            out["bf16 logits"][:, v0:v1] += w_ * z16.float()
            acc = out[SETTINGS[0]][:, v0:v1]
            acc.copy_(acc + (w_ * z16).bfloat16())  # the sum rounded to bf16 at each step
            if role == "teacher_ft":
                magnitude.append(z64.abs().amax(dim=1))
    top = torch.stack(magnitude, 1).amax(1)  # (N,)
    return exact, out, top, offsets


def _timed(fn, peak_rss) -> tuple[float, int]:
    """(seconds, peak resident bytes above the RSS before the call) of one call."""
    import gc

    gc.collect()
    probe = peak_rss()
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    return seconds, probe.peak() - probe.baseline


def cost(args: argparse.Namespace) -> int:
    """Same-process A/B of `float32_logits` (True, the default, against False: the models'
    16-bit logits), settings interleaved, median of `--repeats` after one warm-up each."""
    import statistics

    import torch

    from deltakd.bench.loss import PeakRSS
    from deltakd.losses.fused import fused_distill_loss
    from deltakd.losses.heads import LogitHead

    n, v, chunk = args.cost_n, args.vocab, 256
    g = torch.Generator().manual_seed(args.seed)
    offsets = torch.empty(n).uniform_(8.0, 24.0, generator=g)
    refs = {}
    for role, kind in ROLES.items():
        size = args.teacher_hidden if kind == "teacher" else args.student_hidden
        head = torch.empty(v, size, dtype=torch.bfloat16)
        for v0 in range(0, v, args.vocab_chunk):
            v1 = min(v, v0 + args.vocab_chunk)
            head[v0:v1] = _head_chunk(role, v0, v1, size, args.seed)
        refs[role] = (_hidden(n, size, g, offsets).bfloat16(), head)
    hs = refs["student_raw"][0].clone().requires_grad_()
    ws = refs["student_raw"][1].clone().requires_grad_()

    def fused(wide: bool):
        def call():
            hs.grad = ws.grad = None
            fused_distill_loss(hs, ws, refs, chunk_size=chunk, float32_logits=wide).backward()

        return call

    def dense(wide: bool):
        head = LogitHead(refs["teacher_ft"][1])
        h = refs["teacher_ft"][0]

        def call():
            with torch.no_grad():
                z = head.float32_logits(h) if wide else head.apply(h)  # (N, V)
            return z

        return call

    cases = {("fused Delta-KD loss", wide): fused(wide) for wide in (False, True)}
    cases.update({("dense logits, one role", wide): dense(wide) for wide in (False, True)})
    for fn in cases.values():
        fn()  # warm-up
    times: dict = {k: [] for k in cases}
    mems: dict = {k: [] for k in cases}
    for _ in range(args.repeats):
        for key, fn in cases.items():
            t, m = _timed(fn, PeakRSS)
            times[key].append(t)
            mems[key].append(m)
    print(f"deltakd bench precision --cost: N={n} V={v}, references' H={args.teacher_hidden}, "
          f"student's H={args.student_hidden}, bf16 inputs, chunk {chunk}, threads "
          f"{torch.get_num_threads()}; median of {args.repeats} (settings interleaved)")  # fmt: skip
    rows = []
    for what in ("fused Delta-KD loss", "dense logits, one role"):
        t16, t32 = (statistics.median(times[(what, w)]) for w in (False, True))
        m16, m32 = (statistics.median(mems[(what, w)]) for w in (False, True))
        rows.append({"case": what, "seconds_bf16_logits": t16, "seconds_fp32_product": t32,
                     "time_ratio": t32 / t16, "peak_extra_bytes_bf16_logits": m16,
                     "peak_extra_bytes_fp32_product": m32})  # fmt: skip
        print(f"  {what:<24} bf16 logits {t16:8.3f} s {m16 / 2**30:6.3f} GiB | float32 product "
              f"{t32:8.3f} s {m32 / 2**30:6.3f} GiB | time × {t32 / t16:.3f}")  # fmt: skip
    if args.json:
        print(json.dumps({"cost": rows, "config": {"n": n, "vocab": v, "chunk": chunk,
                          "teacher_hidden": args.teacher_hidden,
                          "student_hidden": args.student_hidden, "repeats": args.repeats}}))  # fmt: skip
    return 0


def run(args: argparse.Namespace) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cost:
        return cost(args)
    start = time.perf_counter()
    exact, out, top, _ = _targets(args)
    tau = args.temperature
    logp = torch.log_softmax(exact / tau, dim=-1)  # (N, V) float64
    p = logp.exp()
    rows = []
    for name in SETTINGS:
        logq = torch.log_softmax(out[name].double() / tau, dim=-1)
        kl = (p * (logp - logq)).sum(-1)  # (N,)
        err = (out[name].double() - exact).abs()
        rows.append({"setting": name, "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
                     "max_abs_logit_error": float(err.max()),
                     "ok": bool(float(kl.mean()) <= BOUND_NATS)})  # fmt: skip
    seconds = time.perf_counter() - start
    print(f"deltakd bench precision: Delta-KD target z* (α={args.alpha}, τ={tau}) at N={args.n} "
          f"V={args.vocab}, teachers' H={args.teacher_hidden}, student's H={args.student_hidden}; "
          f"synthetic heads (logit offsets U[8, 24], random part std 2.5; teacher_ft's |z| max "
          f"{float(top.min()):.1f}–{float(top.max()):.1f}); KL(π*_exact ‖ π*) per token against "
          f"float64, {seconds:.0f} s")  # fmt: skip
    print(f"  {'setting':<26} {'KL mean, nats':>14} {'KL max':>10} {'max |Δz*|':>10} "
          f"{'≤ 1e-3':>7}")  # fmt: skip
    for r in rows:
        print(f"  {r['setting']:<26} {r['kl_mean']:>14.2e} {r['kl_max']:>10.2e} "
              f"{r['max_abs_logit_error']:>10.3f} {'yes' if r['ok'] else 'NO':>7}")  # fmt: skip
    cheapest = next((r["setting"] for r in rows if r["ok"]), None)
    print(f"  cheapest setting within {BOUND_NATS:g} nats/token: {cheapest}")
    if args.json:
        print(json.dumps({"rows": rows, "cheapest": cheapest,
                          "config": {k: getattr(args, k) for k in (
                              "n", "vocab", "teacher_hidden", "student_hidden", "alpha",
                              "temperature", "seed")}}))  # fmt: skip
    return 0
