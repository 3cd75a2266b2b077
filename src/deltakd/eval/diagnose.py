"""`deltakd diagnose CONFIG`: does the Delta-KD premise hold for this config's models and data?

Before anyone spends GPU days, a few hundred response tokens of the config's own data answer:

* how far the target moves from the finetuned teacher: KL(π_ft ‖ π*) per token, π*'s entropy,
  top-1 agreement of π* with π_ft and with the reference token, and the mass of π* outside
  π_ft's top-k, at the configured α and a grid of others;
* how much the raw models agree (top-1 agreement, KL both ways);
* the premise: with a briefly finetuned student (`--student-sft PATH`, or `--sft-steps N`
  trains one through deltakd's own trainer, method `sft`), whether the student's SFT shift
  points where the teacher's does (`premise_cosine`), and whether that student is closer to
  π* than to π_ft (`kl_student_sft_to_target` against `kl_student_sft_to_teacher_ft`);
* with a second finetuned teacher (`teacher_ft2`), how much two SFT seeds of the teacher agree
  (`teacher_seed_cosine`): the ceiling a student's premise cosine can be compared against;
* with a known pretraining corpus (the mini worlds', or `--corpus FILE`), whether the teacher's
  SFT kept what pretraining taught (`teacher_corpus_loss_ratio`).

Definitions (docs/USAGE.md, "Diagnose before you train"). Every per-token figure is a mean over
the response positions of the sample (positions `t` with `assistant_mask[t+1]`; the logits at
`t` score token `t+1`, the reference token). All distributions are `softmax(z / τ)` over the
tokenizer's vocabulary `V` with the config's τ.

* centred logits: `c(z) = z − mean_v z_v` (logits are defined up to a constant per position);
* SFT shift of a model: `Δ = c(z_after) − c(z_before)` per position, a vector in R^V;
* shift cosine: `cos(Δ_a, Δ_b) = ⟨Δ_a, Δ_b⟩ / (‖Δ_a‖·‖Δ_b‖)` per position, averaged over
  positions. `premise_cosine` = cos(Δ_student, Δ_teacher) with Δ_student = student_sft −
  student_raw and Δ_teacher = teacher_ft − teacher_raw; `teacher_seed_cosine` =
  cos(teacher_ft − teacher_raw, teacher_ft2 − teacher_raw); the `_top{k}` variants compare
  the shifts on π_ft's top-k token ids only;
* `kl_student_sft_to_target` = KL(π_student_sft ‖ π*) and `kl_student_sft_to_teacher_ft` =
  KL(π_student_sft ‖ π_ft), the student's distribution first (the reverse directions are
  reported too, as `kl_target_to_student_sft` / `kl_teacher_ft_to_student_sft`);
* `teacher_corpus_loss_ratio` = teacher_ft's held-out corpus loss / teacher_raw's (nats/token).

The suggested α range is `[0, α_max]`: α_max is the largest α of the grid such that at it and
every smaller grid α, KL(π_ft ‖ π*) ≤ `kl_bound` and π*'s top-1 agreement with the reference
token is at most `top1_drop` below π_ft's. The premise holds when the student's SFT is closer to
π* than to π_ft and (when a second teacher exists) the premise cosine is within 0.15 of the
teacher-seed cosine (issue #16's acceptance rule).

Memory: one model is loaded at a time; after its pass only its last hidden states of the
response positions ([N, H], small) and its output layer (`deltakd.heads.logit_head`) are kept,
or its [N, V] logits in the model's dtype when N < H makes them the smaller of the two. Float32
logits are made one chunk of positions at a time, so at V = 152k no role holds an [N, V]
float32 tensor.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from deltakd.errors import ConfigError, DataError

log = logging.getLogger(__name__)

#: The α grid when `--alphas` is not given (the configured α is always added); α = 0 is
#: π_ft itself, the row every other is read against.
DEFAULT_ALPHAS: tuple[float, ...] = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)
#: Premise cosine may sit this far below the teacher-seed cosine (issue #16's acceptance).
PREMISE_COSINE_MARGIN = 0.15
#: The order roles are run in (one model in memory at a time).
ROLE_ORDER: tuple[str, ...] = (
    "teacher_ft",
    "teacher_raw",
    "student_raw",
    "teacher_ft2",
    "student_sft",
)
#: Floats per [chunk, V] logits tensor: chunk = max(1, CHUNK_ELEMENTS // V) positions.
CHUNK_ELEMENTS = 1 << 23

__all__ = ["DEFAULT_ALPHAS", "DiagnoseOptions", "diagnose", "format_report", "shift_cosine"]


@dataclass
class DiagnoseOptions:
    """What `diagnose` measures and on how much data (the CLI's flags)."""

    rows: int = 32
    alphas: Sequence[float] = DEFAULT_ALPHAS
    device: str = "auto"
    seed: int = 0
    split: str | None = None
    batch_size: int = 4
    student_sft: str | None = None
    sft_steps: int = 0
    teacher_ft2: str | None = None
    corpus: str | None = None
    corpus_docs: int = 300
    top_k: Sequence[int] = (5,)
    kl_bound: float = 0.25
    top1_drop: float = 0.03
    progress: bool = True
    #: already-loaded models by role (tests; shares one model between roles)
    models: dict[str, torch.nn.Module] = field(default_factory=dict)


# --- definitions -------------------------------------------------------------------------------


def centred(z: torch.Tensor) -> torch.Tensor:
    """`z − mean_v z` over the last dim (logits are defined up to a per-position constant)."""
    z = z.float()
    return z - z.mean(dim=-1, keepdim=True)


def shift_cosine(
    after_a: torch.Tensor,
    before_a: torch.Tensor,
    after_b: torch.Tensor,
    before_b: torch.Tensor,
    tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-position cosine of two SFT shifts `c(after) − c(before)`.   # 4 × (N, V) -> (N,)

    `tokens` (N, k): compare the shifts on these token ids only (centring stays over the whole
    vocabulary), e.g. the finetuned teacher's top-k, where the probability mass is. A position
    where a shift is zero (the model did not move; below float32 rounding of the logits it is
    a difference of) gives cosine 0, not the cosine of rounding noise."""

    def shift(after: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
        ca, cb = centred(after), centred(before)
        d = ca - cb
        scale = ca.norm(dim=-1, keepdim=True) + cb.norm(dim=-1, keepdim=True)
        return torch.where(d.norm(dim=-1, keepdim=True) > 1e-5 * scale, d, torch.zeros_like(d))

    da, db = shift(after_a, before_a), shift(after_b, before_b)
    if tokens is not None:
        da, db = da.gather(-1, tokens), db.gather(-1, tokens)
    return centred_cosine(da, db, centre=False)


def centred_cosine(a: torch.Tensor, b: torch.Tensor, *, centre: bool = True) -> torch.Tensor:
    """Per-position cosine of `c(a)` and `c(b)` (or of a, b as given).   # (N, V) -> (N,)"""
    if centre:
        a, b = centred(a), centred(b)
    a, b = a.float(), b.float()
    norm = a.norm(dim=-1) * b.norm(dim=-1)
    dot = (a * b).sum(-1)
    return torch.where(norm > 0, dot / norm.clamp_min(1e-30), torch.zeros_like(dot))


# --- accumulating means over positions ---------------------------------------------------------


class _Means:
    """Running sums of per-position values -> means over positions."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, name: str, values: torch.Tensor) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + float(values.double().sum())
        self.counts[name] = self.counts.get(name, 0) + int(values.numel())

    def mean(self, name: str) -> float | None:
        n = self.counts.get(name, 0)
        return self.sums[name] / n if n else None


# --- models ------------------------------------------------------------------------------------


class _Role:
    """One model: its response-position hidden states, and logits made from them by chunk."""

    def __init__(self, name: str, model: torch.nn.Module, vocab_size: int) -> None:
        from deltakd.heads import UnsupportedHeadError, logit_head

        self.name = name
        self.model = model.eval().requires_grad_(False)
        self.vocab_size = vocab_size
        try:
            self.head = logit_head(model, fix="diagnose makes its logits with a full forward.")
        except UnsupportedHeadError as exc:
            log.warning("role %s: %s", name, exc)
            self.head = None
        self.states: list[torch.Tensor] = []  # per batch: (N_b, H) hidden or (N_b, V) logits
        self.precomputed = False  # states are logits before the head's scale / soft cap

    def release(self) -> None:
        """Drop the model, keeping its states and output layer: the next role loads into the
        memory this one's decoder layers held. When the sample has fewer positions than the
        hidden size, its logits (in the model's dtype, as its own head makes them) are smaller
        than the [V, H] head: keep those instead and let the head go too."""
        self.model = None
        head = self.head
        if head is None or sum(int(h.shape[0]) for h in self.states) >= head.weight.shape[1]:
            return
        rows = max(1, CHUNK_ELEMENTS // self.vocab_size)
        self.states = [
            torch.cat([self._linear(h[i : i + rows]) for i in range(0, h.shape[0], rows)])
            for h in self.states
        ]
        # only the scale / soft cap are needed from now on: a one-row copy keeps them
        one = None if head.bias is None else head.bias[:1].clone()
        self.head = dataclasses.replace(head, weight=head.weight[:1].clone(), bias=one)
        self.precomputed = True

    @torch.no_grad()
    def run(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, mask: torch.Tensor
    ) -> None:
        """Keep this batch's response-position states; `mask` is (B, T-1)."""
        if self.head is not None:
            out = self.model.base_model(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False
            )
            h = out.last_hidden_state[:, :-1]  # (B, T-1, H)
        else:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            h = out.logits[:, :-1, : self.vocab_size]  # (B, T-1, V)
        self.states.append(h[mask].detach())

    @torch.no_grad()
    def logits(self, batch: int, start: int, stop: int) -> torch.Tensor:
        """float32 logits (C, V) of positions [start, stop) of batch `batch`."""
        s = self.states[batch][start:stop]
        if self.head is None:
            return s.float()
        z = s if self.precomputed else self._linear(s)
        return self.head.transform_(z.float())

    def _linear(self, h: torch.Tensor) -> torch.Tensor:
        """h @ W.T + b in the states' dtype (the model's own head), sliced to V.   # (C, V)"""
        head = self.head
        assert head is not None
        return torch.nn.functional.linear(
            h,
            head.weight[: self.vocab_size].to(h.dtype),
            None if head.bias is None else head.bias[: self.vocab_size].to(h.dtype),
        )


def _load(role: str, path: str, config: Any, device: torch.device, dtype: torch.dtype) -> Any:
    from deltakd.loading import load_model

    kwargs = {k: v for k, v in config.model_kwargs.items() if k != "dtype"}
    return load_model(
        path,
        dtype=dtype,
        device=device,
        role=role,
        frozen=True,
        trust_remote_code=config.trust_remote_code,
        **kwargs,
    )


def _sibling(path: str | None, role: str) -> str | None:
    """`role` of the built world (a directory with world.json) that `path` belongs to, if any:
    the mini worlds ship a second teacher seed that configs other than multi_teacher omit."""
    from deltakd.data.vocab import resolve_model_path

    if not path:
        return None
    try:
        world = Path(resolve_model_path(path)).parent
    except ConfigError:
        return None
    found = world / role
    return str(found) if (world / "world.json").is_file() and found.is_dir() else None


# --- the target --------------------------------------------------------------------------------


def sweep_target(config: Any) -> tuple[Any, str]:
    """The target family whose α the diagnosis sweeps, and a note on how it was chosen.

    The config's own target (`Method.target`) when its weights depend on α; otherwise (kd,
    or methods without a fixed target: sft, seqkd, minillm) Delta-KD's at the config's α,
    since α is what the diagnosis is about."""
    from deltakd.targets import delta_kd_target
    from deltakd.train.methods import get_method

    target = get_method(config.method).target(config)
    if target is not None and any(a != 0 for _, _, a in target.variant.terms):
        return target, f"the config's target ({target.method}: {target.formula})"
    delta = delta_kd_target(config.replace(divergence=None) if config.divergence else config)
    why = "has no α" if target is not None else "has no fixed target"
    return delta, f"Delta-KD's target ({delta.formula}); method {config.method!r} {why}"


def _target_logits(target: Any, alpha: float, z: dict[str, torch.Tensor]) -> torch.Tensor:
    """π*'s logits at α from the chunk's role logits; a live student inside the target is the
    student before training, i.e. student_raw."""
    from deltakd.losses import parallelogram_target

    t = dataclasses.replace(target, alpha=alpha)
    if t.live_roles:
        return parallelogram_target(t.variant, z["student_raw"], z, alpha=alpha)
    return t.logits(lambda role: z[role])


# --- data --------------------------------------------------------------------------------------


def _sample_rows(config: Any, options: DiagnoseOptions) -> tuple[list[dict], str]:
    from deltakd.data.specs import load_rows, parse_spec

    spec = config.eval_dataset or config.dataset
    split = options.split
    if split is None and config.eval_dataset:
        split = config.eval_split
    if split is None:
        # The mini worlds hold a validation split apart from test (the trainer's rule too).
        split = "validation" if spec.startswith("mini") else parse_spec(spec).default_eval_split
    rows = load_rows(spec, split)
    if not rows:
        raise DataError(f"dataset {spec!r} (split {split!r}) has no rows to diagnose on.")
    rng = random.Random(options.seed)
    picked = sorted(rng.sample(range(len(rows)), min(options.rows, len(rows))))
    return [rows[i] for i in picked], f"{spec} [{split}]"


def _batches(encoded: Sequence[Any], batch_size: int, pad_id: int) -> Iterator[dict]:
    from deltakd.data.tokenize import ChatCollator

    collate = ChatCollator(pad_token_id=pad_id)
    for start in range(0, len(encoded), batch_size):
        feats = [
            {"input_ids": e.input_ids, "assistant_mask": e.assistant_mask}
            for e in encoded[start : start + batch_size]
        ]
        yield collate(feats)


# --- corpus ------------------------------------------------------------------------------------


def _corpus_docs(config: Any, options: DiagnoseOptions) -> tuple[list[str], str] | None:
    """Held-out pretraining text: `--corpus FILE` (plain text: one document per blank-line
    separated paragraph; JSONL: a `text` field per line), else the mini world's own held-out
    stream when teacher_raw lives in a built world (a directory with world.json)."""
    from deltakd.data.vocab import resolve_model_path

    if options.corpus:
        path = Path(options.corpus)
        if not path.is_file():
            raise ConfigError(f"--corpus {path} does not exist: pass a plain-text or JSONL file.")
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            docs = []
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    docs.append(str(json.loads(line)["text"]))
                except (ValueError, KeyError, TypeError) as exc:
                    raise DataError(
                        f"--corpus {path} line {n}: expected a JSON object with a "
                        f"'text' field ({exc})."
                    ) from exc
        else:
            docs = [d.strip() for d in text.split("\n\n") if d.strip()]
        if not docs:
            raise DataError(f"--corpus {path} holds no text.")
        return docs[: options.corpus_docs], str(path)
    world = Path(resolve_model_path(config.teacher_raw)).parent
    info_file = world / "world.json"
    if not info_file.is_file():
        return None
    info = json.loads(info_file.read_text(encoding="utf-8"))
    from deltakd.data.mini.build import heldout_corpus

    # the world's own rule (v1 or v2 corpus, from its world.json), as world.json's figures
    docs = heldout_corpus(info, n_docs=options.corpus_docs)
    return docs, f"{world.name} world held-out corpus ({len(docs)} docs)"


def _corpus_loss(model: Any, tokenizer: Any, docs: list[str]) -> float:
    from deltakd.data.mini.models import BLOCK, corpus_loss, pack_corpus

    if len(pack_corpus(docs, tokenizer)) == 0:
        raise DataError(
            f"the corpus ({len(docs)} documents) holds fewer than {BLOCK} tokens, "
            "one packed block: pass more text (--corpus, --corpus-docs)."
        )
    # blocks per forward: the full-vocabulary logits of a batch stay near CHUNK_ELEMENTS floats
    batch = max(1, min(32, CHUNK_ELEMENTS // (BLOCK * len(tokenizer))))
    return corpus_loss(model, tokenizer, docs, batch_size=batch)


# --- the diagnosis -----------------------------------------------------------------------------


def _train_sft_student(config: Any, steps: int, work: Path) -> str:
    """student_raw after `steps` steps of SFT on the config's data through `deltakd.train`."""
    from deltakd.train.api import train

    sft = config.replace(
        method="sft",
        student=None,
        lam=1.0,
        divergence=None,
        variant=None,
        max_steps=steps,
        output_dir=str(work / "sft"),
        save_steps=max(steps, 1),
        save_total_limit=1,
        eval_dataset=None,
        eval_steps=0,
        resume="never",
        report_to="none",
        references="local",
        fused_loss=False,
        on_policy_ratio=0.0,
        method_args={},
        push_to_hub=False,
    )
    result = train(sft)
    if result.interrupted:  # SIGTERM: the trainer checkpointed and stopped; no final/ model
        raise KeyboardInterrupt
    return str(result.final_dir)


def diagnose(config: Any, options: DiagnoseOptions | None = None) -> dict[str, Any]:
    """Measure the figures of the module docstring; returns them as one flat-ish dict."""
    from tqdm.auto import tqdm

    from deltakd.data.vocab import check_vocabulary, load_tokenizer
    from deltakd.loading import choose_device, reference_dtype

    options = options or DiagnoseOptions()
    if options.rows < 1:
        raise ConfigError(f"--rows {options.rows}: need at least 1 row.")
    alphas = sorted({float(a) for a in options.alphas} | {float(config.alpha)})
    if any(not math.isfinite(a) for a in alphas):
        raise ConfigError(f"--alphas {options.alphas}: every α must be a finite number.")
    for role in ("teacher_ft", "teacher_raw", "student_raw"):
        if not getattr(config, role) and role not in options.models:
            raise ConfigError(
                f"diagnose needs the config's {role} model: set `{role}` in the "
                "config (a directory, mini:<role> or a Hub name)."
            )
    target, target_note = sweep_target(config)
    teacher_ft2 = (
        options.teacher_ft2 or config.teacher_ft2 or _sibling(config.teacher_raw, "teacher_ft2")
    )
    if "teacher_ft2" in target.roles and not teacher_ft2 and "teacher_ft2" not in options.models:
        raise ConfigError(
            f"the target ({target.formula}) needs teacher_ft2: set it in the "
            "config or pass --teacher-ft2 PATH."
        )
    device = choose_device(options.device if options.device != "auto" else config.device)
    dtype = reference_dtype(config)
    tokenizer = load_tokenizer(config.tokenizer_path, trust_remote_code=config.trust_remote_code)

    report: dict[str, Any] = {
        "config_method": config.method,
        "target": target_note,
        "temperature": float(config.temperature),
        "alpha": float(config.alpha),
        "alphas": alphas,
    }
    if teacher_ft2 or "teacher_ft2" in options.models:
        report["teacher_ft2"] = teacher_ft2 or "(given)"
    work = None
    student_sft = options.student_sft
    if options.sft_steps > 0 and not student_sft and "student_sft" not in options.models:
        work = tempfile.TemporaryDirectory(prefix="deltakd-diagnose-")
        student_sft = _train_sft_student(config, options.sft_steps, Path(work.name))
        report["sft_steps"] = options.sft_steps
    try:
        paths = {
            "teacher_ft": config.teacher_ft,
            "teacher_raw": config.teacher_raw,
            "student_raw": config.student_raw,
            "teacher_ft2": teacher_ft2,
            "student_sft": student_sft,
        }
        paths = {r: p for r, p in paths.items() if p and r not in options.models}
        vocab = check_vocabulary(tokenizer, paths, trust_remote_code=config.trust_remote_code)
        batches, labels, source = _sample_batches(config, options, tokenizer, device)
        corpus = _corpus_docs(config, options)
        roles: dict[str, _Role] = {}
        losses: dict[str, float] = {}
        names = [r for r in ROLE_ORDER if r in options.models or r in paths]
        bar = tqdm(
            total=len(batches) * len(names),
            desc="diagnose: models",
            unit="batch",
            disable=not options.progress,
        )
        # One model in memory at a time: its states at the response positions and its output
        # layer stay, its decoder layers go before the next one loads.
        for role in names:
            if role in options.models:
                model = options.models[role].to(device)
            else:
                model = _load(role, paths[role], config, device, dtype)
            r = roles[role] = _Role(role, model, vocab.vocab_size)
            for batch in batches:
                r.run(*batch)
                bar.update(1)
            if corpus is not None and role in ("teacher_raw", "teacher_ft", "teacher_ft2"):
                losses[role] = _corpus_loss(model, tokenizer, corpus[0])
            r.release()
            del model
        bar.close()
        report["rows"] = sum(int(ids.shape[0]) for ids, _, _ in batches)
        report.update(_measure(config, options, roles, labels, source, target, alphas))
        if corpus is not None:
            report["corpus"] = corpus[1]
            for role, loss in losses.items():
                report[f"{role}_corpus_loss"] = loss
            report["teacher_corpus_loss_ratio"] = losses["teacher_ft"] / losses["teacher_raw"]
            if "teacher_ft2" in losses:
                report["teacher_ft2_corpus_loss_ratio"] = (
                    losses["teacher_ft2"] / losses["teacher_raw"]
                )
    finally:
        if work is not None:
            work.cleanup()
    report.update(_verdict(report, options))
    return report


def _sample_batches(
    config: Any, options: DiagnoseOptions, tokenizer: Any, device: torch.device
) -> tuple[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], list[torch.Tensor], str]:
    """The sample as model inputs: [(input_ids, attention_mask, mask (B, T-1))] per batch,
    the reference tokens at the masked positions per batch, and where the rows came from."""
    from deltakd.data.tokenize import encode_rows

    rows, source = _sample_rows(config, options)
    # rows left without a response token are dropped (and all dropped raises DataError)
    encoded = list(
        encode_rows(tokenizer, rows, max_length=config.max_length, truncation="truncate")[0]
    )
    batches, labels = [], []
    for batch in _batches(encoded, options.batch_size, tokenizer.pad_token_id):
        ids = batch["input_ids"].to(device)
        att = batch["attention_mask"].to(device)
        mask = (batch["assistant_mask"][:, 1:] & batch["attention_mask"][:, 1:].bool()).to(device)
        batches.append((ids, att, mask))
        labels.append(ids[:, 1:][mask])
    return batches, labels, source


def _measure(
    config: Any,
    options: DiagnoseOptions,
    roles: dict[str, _Role],
    labels_all: list[torch.Tensor],
    source: str,
    target: Any,
    alphas: list[float],
) -> dict[str, Any]:
    """Average the per-position figures over the sample, a chunk of positions at a time."""
    from tqdm.auto import tqdm

    from deltakd.losses.divergences import kl_from_log_probs

    tau = float(config.temperature)
    ks = sorted({int(k) for k in options.top_k if int(k) > 0})
    means = _Means()
    v = next(iter(roles.values())).vocab_size
    chunk = max(1, CHUNK_ELEMENTS // v)
    n_positions = sum(int(lab.numel()) for lab in labels_all)
    bar = tqdm(
        total=n_positions, desc="diagnose: statistics", unit="tok", disable=not options.progress
    )

    def logp(z: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(z / tau, dim=-1)

    for b, labels in enumerate(labels_all):
        for start in range(0, int(labels.numel()), chunk):
            stop = min(start + chunk, int(labels.numel()))
            ref = labels[start:stop]
            z = {name: r.logits(b, start, stop) for name, r in roles.items()}  # each (C, V)
            lp_ft = logp(z["teacher_ft"])
            top1_ft = lp_ft.argmax(-1)
            means.add("teacher_ft_entropy", -(lp_ft.exp() * lp_ft).sum(-1))
            topk_ft = {k: lp_ft.topk(min(k, v), dim=-1).indices for k in ks}
            lp_raw = {r: logp(z[r]) for r in ("teacher_raw", "student_raw")}
            for name in ("teacher_ft", "teacher_raw", "student_raw", "teacher_ft2", "student_sft"):
                if name in z:
                    means.add(f"{name}_top1_agree_reference", (z[name].argmax(-1) == ref).float())
            means.add(
                "raw_top1_agreement",
                (lp_raw["teacher_raw"].argmax(-1) == lp_raw["student_raw"].argmax(-1)).float(),
            )
            means.add(
                "kl_teacher_raw_to_student_raw",
                kl_from_log_probs(lp_raw["teacher_raw"], lp_raw["student_raw"]),
            )
            means.add(
                "kl_student_raw_to_teacher_raw",
                kl_from_log_probs(lp_raw["student_raw"], lp_raw["teacher_raw"]),
            )
            means.add(
                "kl_teacher_raw_to_teacher_ft", kl_from_log_probs(lp_raw["teacher_raw"], lp_ft)
            )
            means.add(
                "teacher_ft_raw_logit_cosine", centred_cosine(z["teacher_ft"], z["teacher_raw"])
            )
            lp_traw = lp_raw["teacher_raw"]
            del lp_raw
            # the same cosines on π_ft's top-k only (largest k): the shift where the mass is,
            # not in the far tail, where a small model's logits drift freely
            top_ids = topk_ft[ks[-1]] if ks else None
            pairs = {
                "teacher_seed_cosine": ("teacher_ft2", "teacher_raw", "teacher_ft", "teacher_raw"),
                "premise_cosine": ("student_sft", "student_raw", "teacher_ft", "teacher_raw"),
            }
            for name, (a1, b1, a2, b2) in pairs.items():
                if a1 in z:
                    means.add(name, shift_cosine(z[a1], z[b1], z[a2], z[b2]))
                    if top_ids is not None:
                        cos = shift_cosine(z[a1], z[b1], z[a2], z[b2], tokens=top_ids)
                        means.add(f"{name}_top{ks[-1]}", cos)
            lp_sft = logp(z["student_sft"]) if "student_sft" in z else None
            if lp_sft is not None:
                means.add("kl_student_sft_to_teacher_ft", kl_from_log_probs(lp_sft, lp_ft))
                means.add("kl_teacher_ft_to_student_sft", kl_from_log_probs(lp_ft, lp_sft))
            for a in alphas:
                lp_t = logp(_target_logits(target, a, z))
                key = _alpha_key(a)
                means.add(f"{key}/kl_teacher_ft_to_target", kl_from_log_probs(lp_ft, lp_t))
                means.add(f"{key}/target_entropy", -(lp_t.exp() * lp_t).sum(-1))
                top1_t = lp_t.argmax(-1)
                means.add(f"{key}/target_top1_agree_teacher_ft", (top1_t == top1_ft).float())
                means.add(f"{key}/target_top1_agree_reference", (top1_t == ref).float())
                wrong = top1_t != ref
                if wrong.any():
                    # where π*'s top token is wrong, how unlikely the raw teacher found it:
                    # very negative values are the tail ratio π_student_raw / π_teacher_raw
                    # blowing up (issue 16), not a shift carried over from SFT
                    picked = lp_traw.gather(-1, top1_t[:, None])[:, 0]
                    means.add(f"{key}/teacher_raw_logprob_of_wrong_target_top1", picked[wrong])
                p_t = lp_t.exp()
                for k, idx in topk_ft.items():
                    inside = p_t.gather(-1, idx).sum(-1)
                    means.add(
                        f"{key}/target_mass_outside_teacher_ft_top{k}",
                        (1.0 - inside).clamp_min(0.0),
                    )
                if lp_sft is not None:
                    means.add(f"{key}/kl_student_sft_to_target", kl_from_log_probs(lp_sft, lp_t))
                    means.add(f"{key}/kl_target_to_student_sft", kl_from_log_probs(lp_t, lp_sft))
                del lp_t, p_t
            bar.update(stop - start)
    bar.close()
    out: dict[str, Any] = {
        "data": source,
        "positions": n_positions,
        "vocab_size": v,
        "top_k": ks,
    }
    per_alpha: dict[str, dict[str, float]] = {}
    for name in means.sums:
        value = means.mean(name)
        if "/" in name:
            key, metric = name.split("/", 1)
            per_alpha.setdefault(key, {})[metric] = value
        else:
            out[name] = value
    out["per_alpha"] = per_alpha
    # the configured α's figures at the top level, under their own names
    out.update(per_alpha[_alpha_key(float(config.alpha))])
    return out


def _alpha_key(alpha: float) -> str:
    return f"{alpha:g}"


def _verdict(report: dict[str, Any], options: DiagnoseOptions) -> dict[str, Any]:
    """The suggested α range and whether the premise holds (rules in the module docstring)."""
    ref_ft = report["teacher_ft_top1_agree_reference"]
    alpha_max = 0.0
    for a in report["alphas"]:
        m = report["per_alpha"][_alpha_key(a)]
        ok = (
            m["kl_teacher_ft_to_target"] <= options.kl_bound
            and m["target_top1_agree_reference"] >= ref_ft - options.top1_drop
        )
        if not ok:
            break
        alpha_max = a
    out: dict[str, Any] = {
        "suggested_alpha_range": [0.0, alpha_max],
        "alpha_rule": (
            f"largest grid α with KL(π_ft‖π*) ≤ {options.kl_bound:g} nats/token and "
            f"π*'s top-1 agreement with the reference ≥ π_ft's − {options.top1_drop:g}, "
            "at it and every smaller grid α"
        ),
    }
    if "premise_cosine" in report:
        closer = report["kl_student_sft_to_target"] < report["kl_student_sft_to_teacher_ft"]
        aligned = None
        if "teacher_seed_cosine" in report:
            aligned = (
                report["premise_cosine"] >= report["teacher_seed_cosine"] - PREMISE_COSINE_MARGIN
            )
        out["premise_closer_to_target"] = closer
        out["premise_cosine_within_margin"] = aligned
        out["premise_holds"] = bool(closer and aligned is not False)
    return out


def format_report(report: dict[str, Any]) -> str:
    """The human-readable report: the figures, then the verdict."""

    def f(x: Any) -> str:
        return "—" if x is None else (f"{x:.4g}" if isinstance(x, float) else str(x))

    r = report
    lines = [
        f"data: {r['data']}: {r['rows']} rows, {r['positions']} response tokens, V={r['vocab_size']}",
        f"target: {r['target']}; τ={f(r['temperature'])}, configured α={f(r['alpha'])}",
        "",
        "finetuned teacher: entropy {} nats, top-1 = reference {}".format(
            f(r["teacher_ft_entropy"]), f(r["teacher_ft_top1_agree_reference"])
        ),
        "raw models: top-1 agreement {}, KL(teacher_raw‖student_raw) {}, "
        "KL(student_raw‖teacher_raw) {}".format(
            f(r["raw_top1_agreement"]),
            f(r["kl_teacher_raw_to_student_raw"]),
            f(r["kl_student_raw_to_teacher_raw"]),
        ),
        "teacher SFT: centred cosine(z_ft, z_raw) {}, KL(teacher_raw‖teacher_ft) {}".format(
            f(r["teacher_ft_raw_logit_cosine"]), f(r["kl_teacher_raw_to_teacher_ft"])
        ),
        "",
    ]
    ks = r["top_k"]
    head = ["α", "KL(π_ft‖π*)", "H(π*)", "top1=π_ft", "top1=ref"]
    head += [f"mass∉top{k}" for k in ks]
    if "premise_cosine" in r:
        head += ["KL(sft‖π*)"]
    rows = [head]
    for a in r["alphas"]:
        m = r["per_alpha"][_alpha_key(a)]
        row = [
            f"{a:g}",
            f(m["kl_teacher_ft_to_target"]),
            f(m["target_entropy"]),
            f(m["target_top1_agree_teacher_ft"]),
            f(m["target_top1_agree_reference"]),
        ]
        row += [f(m[f"target_mass_outside_teacher_ft_top{k}"]) for k in ks]
        if "premise_cosine" in r:
            row += [f(m.get("kl_student_sft_to_target"))]
        rows.append(row)
    widths = [max(len(x[i]) for x in rows) for i in range(len(head))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines.append("")
    k = r["top_k"][-1] if r["top_k"] else None

    def on_top(name: str) -> str:
        return f" ({f(r[f'{name}_top{k}'])} on π_ft's top {k})" if f"{name}_top{k}" in r else ""

    if "teacher_seed_cosine" in r:
        lines.append(
            "teacher-seed cosine (teacher_ft vs teacher_ft2 shifts): "
            f"{f(r['teacher_seed_cosine'])}{on_top('teacher_seed_cosine')}"
        )
    if "premise_cosine" in r:
        lines.append(
            "premise: cosine(student SFT shift, teacher SFT shift) = "
            f"{f(r['premise_cosine'])}{on_top('premise_cosine')}; KL(student_sft‖π*) = "
            f"{f(r['kl_student_sft_to_target'])} vs KL(student_sft‖π_ft) = "
            f"{f(r['kl_student_sft_to_teacher_ft'])}"
        )
    else:
        lines.append("premise: not checked (pass --student-sft PATH or --sft-steps N)")
    if "teacher_corpus_loss_ratio" in r:
        extra = (
            f", teacher_ft2 {f(r['teacher_ft2_corpus_loss'])}"
            if "teacher_ft2_corpus_loss" in r
            else ""
        )
        lines.append(
            f"corpus loss ({r['corpus']}): teacher_raw {f(r['teacher_raw_corpus_loss'])}, "
            f"teacher_ft {f(r['teacher_ft_corpus_loss'])}{extra} nats/token; "
            f"ratio {f(r['teacher_corpus_loss_ratio'])}"
        )
    lines.append("")
    lines.append("verdict:")
    if "premise_holds" in r:
        # Each criterion says whether it is met, so a FAILS line that lists a met one is not
        # read as its cause.
        why = []
        closer = r["premise_closer_to_target"]
        why.append(
            "the SFT'd student is "
            + (
                "closer to π* than to π_ft (met)"
                if closer
                else "closer to π_ft than to π* (missed)"
            )
        )
        within = r["premise_cosine_within_margin"]
        if within is not None:
            why.append(
                f"its shift cosine is {'within' if within else 'more than'} "
                f"{PREMISE_COSINE_MARGIN:g} of the teacher-seed cosine "
                f"({'met' if within else 'missed'})"
            )
        lines.append(f"  premise {'HOLDS' if r['premise_holds'] else 'FAILS'}: " + "; ".join(why))
    if "teacher_corpus_loss_ratio" in r:
        ratio = r["teacher_corpus_loss_ratio"]
        lines.append(
            f"  teacher SFT is {'a local shift' if ratio <= 1.3 else 'a rewrite'} "
            f"(corpus loss ratio {ratio:.3g}; ≤ 1.3 counts as local)"
        )
    lo, hi = r["suggested_alpha_range"]
    lines.append(f"  suggested α range: [{lo:g}, {hi:g}] ({r['alpha_rule']})")
    if r.get("premise_holds") is False:
        lines.append(
            "  with the premise failing, expect α > 0 to help little: compare against "
            "plain KD (α = 0) before a long run"
        )
    return "\n".join(lines)


def json_line(report: dict[str, Any]) -> str:
    """Every figure as one JSON line (NaN/inf written as null)."""

    def clean(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(report), ensure_ascii=False, sort_keys=True)
