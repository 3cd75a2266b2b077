"""`deltakd bench cache`: what the offline target cache costs and saves, per k.

For each k (default 8, 32, 64, 128, V) and tail-model rank r (default 0 and 64; `cache.tail_rank`,
skipped at k = V, which has no tail) on the mini world's training rows:

- ``bytes_per_token``: shard bytes (headers and row tables included) per cached response
  position, as written by `deltakd cache build` (fp16 log-probabilities by default).
- ``kl_nats``: mean over response positions of KL(p ‖ q) in nats, where p = softmax(z*/τ) is
  the dense Delta-KD target computed from the three models in float32, and q is the sparse
  target read back from the cache: q_i = exp(stored logprob_i) on the k stored tokens, and the
  stored tail mass spread over the other V − k tokens by the tail model (r > 0) or uniformly
  (r = 0) (q renormalised to sum to 1, which only undoes fp16 rounding). At k = V only the
  value rounding remains. The tail model is fitted on the first `--fit-rows` rows (default half
  of them) and the KL is averaged over the other, held-out rows, for every row of the table;
  the model's file (r × V float32, once per cache) is reported apart from bytes per token.
- ``throughput_vs_sft`` / ``throughput_vs_local``: training tokens/s of `deltakd train` with
  `references: cache` at that k, divided by plain SFT (no references) and by Delta-KD with local
  references, all measured in this process on the same rows, seed and steps. Step times skip
  the first step (warm-up); every run sees the same batches in the same order, so the tokens/s
  ratio is the steps/s ratio. Runs are repeated `--repeats` times, interleaved, and each step
  counts with its fastest time over the repeats (CPU contention only ever adds time). With
  `--clock cpu` steps are timed by the process's CPU time (every thread, so the cache's
  prefetch worker counts) instead of the wall clock, for machines shared with other jobs.

Uses the shipped mini world when present, else freshly initialised models of its shapes (then
the KL figures describe untrained models, whose distributions are flatter: say so when
quoting them; the command prints which world it used).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

DEFAULT_KS = "8,32,64,128,V"
DEFAULT_RANKS = "0,64"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--world",
        default=None,
        help="directory with tokenizer/, teacher_ft/, teacher_raw/, student_raw/ (default: the "
        "shipped mini world, else untrained models of its shapes)",
    )
    parser.add_argument("--dataset", default="mini:instruct", help="training rows (a dataset spec)")
    parser.add_argument("--rows", type=int, default=256, help="training rows used")
    parser.add_argument(
        "--fit-rows",
        type=int,
        default=None,
        help="rows the tail model is fitted on (default: the first half); KL is averaged over "
        "the other rows only, for every k and rank alike",
    )
    parser.add_argument("--ks", default=DEFAULT_KS, help="comma-separated k values; V = all")
    parser.add_argument(
        "--tail-ranks",
        default=DEFAULT_RANKS,
        help="comma-separated tail-model ranks (cache.tail_rank; 0 = tail bucket only)",
    )
    parser.add_argument("--alpha", type=float, default=1.0, help="Delta-KD α")
    parser.add_argument("--temperature", type=float, default=1.0, help="τ")
    parser.add_argument(
        "--value-dtype",
        default="fp16",
        choices=("fp16", "bf16", "fp32", "q4", "q5", "q6", "q7", "q8"),
        help="cache.value_dtype (q6/q7/q8: b-bit companded levels, format version 2)",
    )
    parser.add_argument(
        "--index-dtype",
        default="auto",
        choices=("auto", "uint16", "uint24", "int32", "packed"),
        help="cache.index_dtype (packed: Elias–Fano id sets, format version 2)",
    )
    parser.add_argument(
        "--bytes-vocab",
        type=int,
        default=151936,
        help="also measure bytes/token with the cached rows' ids spread at random over a "
        "vocabulary of this size (default 151936, Qwen2.5; 0 = skip)",
    )
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per timed run")
    parser.add_argument("--batch", type=int, default=8, help="rows per step")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per row")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="time steps by the wall clock, or by this process's CPU time (all its threads; "
        "robust when other jobs share the cores)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed runs per configuration, interleaved; each step's fastest time counts",
    )


def _world(arg: str | None, tmp: Path) -> tuple[Path, str]:
    if arg:
        return Path(arg), f"world {arg}"
    try:
        from deltakd.data.mini import mini_world_dir

        return mini_world_dir(), "shipped mini world"
    except Exception:
        pass
    from deltakd.data.mini.corpus import make_corpus
    from deltakd.data.mini.models import STUDENT, TEACHER, make_model
    from deltakd.data.mini.tokenizer import train_tokenizer

    root = tmp / "world"
    tok = train_tokenizer(make_corpus(seed=0, n_docs=300), root / "tokenizer")
    for role, shape, seed in (("teacher_raw", TEACHER, 1), ("teacher_ft", TEACHER, 2),
                              ("student_raw", STUDENT, 3)):  # fmt: skip
        make_model(shape, tok, seed=seed).save_pretrained(root / role)
        tok.save_pretrained(root / role)
    return root, "UNTRAINED models of the mini world's shapes (the mini world is not shipped)"


def _step_timer(clock: Any) -> Any:
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.ends.append(clock())

    return StepTimer()


def _step_times(config: Any, clock: Any) -> list[float]:
    """Seconds of steps 2..N of one training run (step 1 is warm-up)."""
    from deltakd.train.api import train

    timer = _step_timer(clock)
    train(config, callbacks=[timer])
    ends = timer.ends
    if len(ends) < 2:
        raise RuntimeError("too few steps to time; use --steps >= 2")
    return [b - a for a, b in itertools.pairwise(ends)]


def sparse_kl(dense_logp: Any, target: Any) -> Any:
    """KL(p ‖ q) per position, nats. `dense_logp` (n, V) log-probabilities of p; `target` a
    SparseTarget of leading shape (n,): q = stored top-k probabilities and the tail mass spread
    by its tail model, or uniformly over the other V − k tokens without one; renormalised."""
    import dataclasses

    import torch

    # A tail mass stored as 0 (1 − Σ top-k rounded below 0) is floored, as in the loss's bucket:
    # the dense target may still hold a sliver there.
    target = dataclasses.replace(target, tail_mass=target.tail_mass.clamp_min(1e-38))
    logq = target.dense_logprobs(vocab_size=dense_logp.shape[-1]).float()
    logq = torch.log_softmax(logq, dim=-1)  # renormalise: undoes the values' rounding only
    p = dense_logp.exp()
    return torch.where(p > 0, p * (dense_logp - logq), 0.0).sum(-1)  # (n,)


def run(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="deltakd-bench-cache-"))
    try:
        return _run(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run(args: argparse.Namespace, tmp: Path) -> int:
    import torch

    from deltakd.config import load_config
    from deltakd.losses import delta_target
    from deltakd.references.cache.build import build_cache, encode_dataset
    from deltakd.references.cache.source import CacheReferences
    from deltakd.references.local import LocalReferences

    root, world_note = _world(args.world, tmp)
    base: dict[str, Any] = {
        "student_raw": str(root / "student_raw"),
        "teacher_ft": str(root / "teacher_ft"),
        "teacher_raw": str(root / "teacher_raw"),
        "tokenizer": str(root / "tokenizer"),
        "dataset": args.dataset,
        "limit": args.rows,
        "max_length": args.max_length,
        "max_prompt_length": max(1, args.max_length // 2),
        "per_device_batch_size": args.batch,
        "alpha": args.alpha,
        "temperature": args.temperature,
        "learning_rate": 1e-4,
        "lr_scheduler": "constant",
        "max_steps": max(args.steps, 2),
        "logging_steps": 1,
        "save_steps": 0,
        "resume": "never",
        "progress": False,
        "device": "cpu",
        "seed": 0,
    }

    def config(name: str, **extra: Any) -> Any:
        return load_config(None, {**base, "output_dir": str(tmp / "runs" / name), **extra})

    local_cfg = config("local", method="delta_kd")
    from deltakd.data.vocab import load_tokenizer

    tok = load_tokenizer(local_cfg.tokenizer_path)
    v = len(tok)
    ks = [v if s.strip().upper() == "V" else min(int(s), v) for s in args.ks.split(",")]
    ranks = [int(r) for r in args.tail_ranks.split(",")]
    combos = [(k, r) for k in ks for r in ranks if r == 0 or k < v]
    roles = ("teacher_ft", "teacher_raw", "student_raw")
    local = LocalReferences({r: getattr(local_cfg, r) for r in roles})

    # Dense targets at every response position, in the order the cache is read back.
    from deltakd.data.tokenize import ChatCollator

    data = encode_dataset(local_cfg, tok)
    collate = ChatCollator(pad_token_id=tok.pad_token_id)
    feats = [{"input_ids": i, "assistant_mask": m, "row_index": r}
             for i, m, r in zip(data.ids, data.masks, data.row_indices)]  # fmt: skip
    batches = [collate(feats[j:j + args.batch]) for j in range(0, len(feats), args.batch)]  # fmt: skip
    # The tail model is fitted on the first unique rows (build order); KL is scored elsewhere.
    uniq = data.unique()
    fit_rows = min(len(uniq) - 1, args.fit_rows if args.fit_rows is not None else len(uniq) // 2)
    fit_keys = {data.keys[i] for i in uniq[:fit_rows]}
    fit_positions = sum(sum(data.masks[i][1:]) for i in uniq[:fit_rows])
    held_rows = [data.keys[i] not in fit_keys for i in range(len(data.ids))]
    dense: list[torch.Tensor] = []
    masks: list[torch.Tensor] = []
    for key, batch in enumerate(batches):
        ref = local.fetch(key, batch).logits
        z = delta_target(*(ref[r][:, :-1, :v] for r in roles), alpha=args.alpha)
        mask = batch["assistant_mask"][:, 1:].bool() & batch["attention_mask"][:, 1:].bool()
        held = torch.tensor(held_rows[key * args.batch : key * args.batch + len(mask)])  # (B,)
        mask &= held[:, None]
        dense.append(torch.log_softmax(z[mask].float() / args.temperature, dim=-1))  # (n, V)
        masks.append(mask)
    n_positions = sum(int(m.sum()) for m in masks)
    if fit_positions < max(ranks) or n_positions == 0:
        from deltakd.errors import ConfigError

        raise ConfigError(f"bench cache: {fit_rows} fit rows give {fit_positions} positions and "
                         f"{n_positions} are held out; a rank-{max(ranks)} tail model needs more "
                         "fit positions and some held-out rows: raise --rows or --fit-rows.")  # fmt: skip

    rows: list[dict[str, Any]] = []
    cache_cfgs: dict[str, Any] = {}
    for k, rank in combos:
        name = _name(k, rank)
        cfg = config(name, method="delta_kd", references="cache",
                     cache={"dir": str(tmp / name), "k": k, "tail_rank": rank,
                            "tail_fit_positions": max(fit_positions, 1),
                            "value_dtype": args.value_dtype,
                            "index_dtype": args.index_dtype})  # fmt: skip
        cache_cfgs[name] = cfg
        manifest = build_cache(cfg, references=local, progress=False).manifest
        source = CacheReferences(cfg.cache["dir"])
        kls = []
        for key, (batch, mask, logp) in enumerate(zip(batches, masks, dense)):
            t = source.fetch(key, batch).target
            sel = t.map_positions(lambda x: x[:, :-1][mask])  # noqa: B023
            kls.append(sparse_kl(logp, sel))
        source.close()
        big = (bytes_at_vocab(cfg.cache["dir"], args.bytes_vocab, args.index_dtype, tmp / "big")
               if args.bytes_vocab and k < v else None)  # fmt: skip
        rows.append({"k": k, "tail_rank": rank, "name": name,
                     "bytes_per_token": manifest.bytes_per_token(),
                     "bytes_per_token_big_vocab": big,
                     "kl_nats": float(torch.cat(kls).mean()),
                     "tail_model_bytes": int(manifest.tail_model.get("bytes", 0)),
                     "bytes_per_position": manifest.encoding["bytes_per_position"]})  # fmt: skip
    local.close()

    tps: dict[str, float] = {}
    if args.steps >= 2:
        runs = {"sft": config("sft", method="sft"), "local": local_cfg}
        runs.update(cache_cfgs)
        best: dict[str, list[float]] = {}
        clock = time.process_time if args.clock == "cpu" else time.perf_counter
        for r in range(max(args.repeats, 1)):
            for name, cfg in runs.items():
                # A fresh run directory each time: a finished run leaves a checkpoint behind.
                out = tmp / "runs" / f"{name}-{r}"
                times = _step_times(cfg.replace(output_dir=str(out)), clock)
                prev = best.get(name, times)
                best[name] = [min(a, b) for a, b in zip(prev, times)]
        tps = {name: len(t) / sum(t) for name, t in best.items()}
    mean_tokens = sum(len(x) for x in data.ids) / len(data.ids) * args.batch
    for row in rows:
        s = tps.get(row["name"])
        row["tokens_per_s"] = s * mean_tokens if s else None
        row["throughput_vs_sft"] = s / tps["sft"] if s else None
        row["throughput_vs_local"] = s / tps["local"] if s else None

    print(f"deltakd bench cache: {world_note}; {args.dataset} {len(data.ids)} rows, "
          f"KL over {n_positions} response positions of {len(data.ids) - fit_rows} rows held out from the "
          f"tail-model fit ({fit_positions} positions of {fit_rows} rows), V={v}, α={args.alpha}, τ={args.temperature}, "
          f"{args.value_dtype} log-probs, {args.index_dtype} ids, {args.steps} steps × {args.batch} rows, "
          f"{args.threads} thread(s), fastest step of {args.repeats} runs, {args.clock} clock")  # fmt: skip
    if tps:
        print(f"  sft {tps['sft'] * mean_tokens:.0f} tok/s, delta_kd local "
              f"{tps['local'] * mean_tokens:.0f} tok/s (mean {mean_tokens:.0f} tokens/step)")  # fmt: skip
    big_head = f"B/tok V={args.bytes_vocab}" if args.bytes_vocab else ""
    print(f"  {'k':>6} {'rank':>5} {'bytes/token':>12} {big_head:>16} {'KL nats':>10} {'tok/s':>8} "
          f"{'vs sft':>7} {'vs local':>8}")  # fmt: skip
    for row in rows:
        t = row["tokens_per_s"]
        b = row["bytes_per_token_big_vocab"]
        big_cell = f"{b:.1f}" if b else ("-" if args.bytes_vocab else "")
        print(f"  {row['k']:>6} {row['tail_rank']:>5} {row['bytes_per_token']:>12.1f} "
              f"{big_cell:>16} "
              f"{row['kl_nats']:>10.2e} "
              f"{(f'{t:.0f}' if t else '-'):>8} "
              f"{_fmt(row['throughput_vs_sft']):>7} {_fmt(row['throughput_vs_local']):>8}")  # fmt: skip
    for row in rows:
        if row["tail_model_bytes"]:
            print(f"  k={row['k']} rank {row['tail_rank']}: the tail model file holds "
                  f"{row['tail_model_bytes'] / 1e6:.2f} MB once per cache (not in bytes/token)")  # fmt: skip
    if args.json:
        keys = ("k", "tail_rank", "bytes_per_token", "kl_nats", "throughput_vs_sft",
                "throughput_vs_local", "bytes_per_token_big_vocab")  # fmt: skip
        print(json.dumps([{key: row[key] for key in keys} for row in rows]))
    return 0


def bytes_at_vocab(cache_dir: str, vocab: int, index_dtype: str, tmp: Path) -> float:
    """Shard bytes per position of a built cache's rows re-encoded with their token ids spread
    at random (a fixed injection) over a `vocab`-token vocabulary: the same rows, positions,
    k, values and shard layout, the id width of a large vocabulary (`auto` ids resolved for
    it). Packed ids have a fixed width per position, so how the ids are spread does not
    change their bytes once the largest id is near V."""
    import torch

    from deltakd.references.cache.format import SHARD_PATTERN, resolve_index_dtype
    from deltakd.references.cache.reader import CacheReader
    from deltakd.references.cache.writer import CachedRow, encode_rows, write_shard

    reader = CacheReader(cache_dir, verify=False)
    m = reader.manifest
    v = int(m.tokenizer["vocab_size"])
    spread = torch.randperm(vocab, generator=torch.Generator().manual_seed(0))[:v]
    index = resolve_index_dtype(index_dtype, vocab)
    order = sorted(reader.index.items(), key=lambda item: item[1])
    rows = []
    for key, (_, r) in order:
        t = reader.row(key)
        rows.append(CachedRow(key, r, t.positions, spread[t.indices], t.logprobs, t.tail_mass,
                              t.tail_coeffs))  # fmt: skip
    reader.close()
    tmp.mkdir(parents=True, exist_ok=True)
    from safetensors import safe_open

    with safe_open(str(Path(cache_dir) / m.shards[0].file), framework="pt") as fh:
        meta = fh.metadata() or {}  # the same header text as the real shards
    total = 0
    for s, a in enumerate(range(0, len(rows), m.rows_per_shard)):
        tensors = encode_rows(rows[a : a + m.rows_per_shard], reader.k, index,
                              m.encoding["value_dtype"], m.tail_rank)  # fmt: skip
        total += write_shard(tmp / SHARD_PATTERN.format(s), tensors, meta)
    return total / max(sum(len(r.positions) for r in rows), 1)


def _name(k: int, rank: int) -> str:
    return f"cache-{k}" if rank == 0 else f"cache-{k}-r{rank}"


def _fmt(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.2f}"
