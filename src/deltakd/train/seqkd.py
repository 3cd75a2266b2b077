"""SeqKD (Kim & Rush 2016, "Sequence-Level Knowledge Distillation", arXiv 1606.07947).

The finetuned teacher answers every training prompt once; the student is then trained with
plain SFT (cross-entropy on the assistant tokens) on those answers instead of the dataset's.

- Prompts are each row's messages before its last assistant message; the teacher's reply
  replaces that message (later messages are dropped). Generation goes through
  `deltakd.generation` (batched, left-padded, stopping at eos / `<|im_end|>`), greedy by
  default, at most `max_new_tokens` tokens.
- The generations are cached as JSONL in `output_dir/seqkd_generations.jsonl` (or
  `method_args.cache_file`), one line per prompt keyed by a SHA-256 of the rendered prompt, the
  teacher's identity (resolved path and the size / mtime of its weight files) and the
  generation settings. A rerun or resume reuses every cached answer and generates only missing
  ones; lines are appended in chunks, so a killed generation resumes where it stopped.
- In multi-process runs every rank generates its own share of the missing prompts (every
  world-th one) into its own file beside the cache (`<name>.rank<r>.jsonl`), then reads the
  others' files until every prompt has its answer. There is no collective to time out while the
  teacher writes for hours, each rank resumes from its own file, and a later run with another
  number of ranks reads every file.
- The teacher sees each whole prompt (`max_prompt_length` does not cut it); rows longer than
  `max_length` after the reply is added are truncated or dropped as configured (`truncation`).

- `generation.backend: vllm` generates the replies with a vLLM engine over teacher_ft
  (`deltakd.generation.vllm`; its settings in the same `generation` section, dtype by default
  the references'). vLLM's cache keys differ from hf's, so switching the backend regenerates.
- Cache records keep each reply's `finish_reason` (`stop` / `length`); replies that hit
  `max_new_tokens` are unfinished answers, so they are dropped from training and counted in the
  log unless `method_args.keep_truncated: true`.

`method_args` (all optional): `do_sample` (false = greedy), `temperature` (1.0), `top_p` (1.0),
`seed` (the run's `seed`; sampling only), `batch_size` (generation batch, 16), `cache_file`,
`keep_truncated` (false).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import deltakd.generation as generation
from deltakd.config.fields import Section, help_meta
from deltakd.errors import CacheError, ConfigError, DataError
from deltakd.generation.vllm import backend_from_section
from deltakd.train.methods import SFT, method_arguments, register_method

if TYPE_CHECKING:
    from deltakd.train.config import TrainConfig

logger = logging.getLogger("deltakd.train")


@dataclass(eq=True)
class SeqKDArgs(Section):
    """`method_args` of `seqkd`: how the teacher decodes, and where its replies are cached."""

    key: ClassVar[str] = "method_args"

    do_sample: bool = field(
        default=False, metadata=help_meta("sample the teacher's replies instead of greedy")
    )
    temperature: float = field(default=1.0, metadata=help_meta("sampling temperature (> 0)"))
    top_p: float = field(default=1.0, metadata=help_meta("nucleus sampling mass, in (0, 1]"))
    seed: int | None = field(
        default=None, metadata=help_meta("sampling seed", default_text="the run's `seed`")
    )
    batch_size: int = field(default=16, metadata=help_meta("prompts per generation batch"))
    cache_file: str | None = field(
        default=None,
        metadata=help_meta(
            "JSONL cache of the replies", default_text="`<output_dir>/seqkd_generations.jsonl`"
        ),
    )
    keep_truncated: bool = field(
        default=False,
        metadata=help_meta("train on replies that hit `max_new_tokens` (unfinished answers)"),
    )


SEQKD_ARGS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(SeqKDArgs))
CACHE_NAME = "seqkd_generations.jsonl"
#: prompts generated between two appends to the cache file
CHUNK = 64


def generation_settings(config: TrainConfig) -> generation.GenerationSettings:
    """The teacher's decoding settings from `max_new_tokens` and `method_args`."""
    a: SeqKDArgs = method_arguments("seqkd", SeqKDArgs, config.method_args)  # type: ignore[assignment]
    try:
        return generation.GenerationSettings(
            max_new_tokens=config.max_new_tokens,
            batch_size=a.batch_size,
            do_sample=a.do_sample,
            temperature=a.temperature,
            top_p=a.top_p,
            seed=a.seed if a.seed is not None else config.seed,
            backend=backend_from_section(config.generation)[0],
        )
    except ConfigError as exc:
        raise ConfigError(f"seqkd method_args: {exc}") from exc


def teacher_identity(path: str) -> str:
    """Resolved model path plus the size and mtime of its weight files (a retrained teacher
    at the same path gets new cache keys)."""
    from deltakd.data.vocab import resolve_model_path

    resolved = resolve_model_path(path)
    p = Path(resolved)
    parts = [str(p.resolve()) if p.exists() else resolved]
    if p.is_dir():
        for f in sorted(p.iterdir()):
            if f.suffix in (".safetensors", ".bin", ".json") and f.is_file():
                st = f.stat()
                parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


def cache_key(prompt_text: str, teacher: str, settings: generation.GenerationSettings) -> str:
    """SHA-256 of the rendered prompt, the teacher identity and the decoding settings."""
    s = settings
    # batch_size does not change greedy outputs (generate sorts by length), so it is left out.
    decoding = (
        {"do_sample": True, "temperature": s.temperature, "top_p": s.top_p, "seed": s.seed}
        if s.do_sample
        else {"do_sample": False}
    )
    if s.backend != "hf":  # hf keys stay what they were before there was a choice
        decoding["backend"] = s.backend
    blob = json.dumps(
        {"prompt": prompt_text, "teacher": teacher, "max_new_tokens": s.max_new_tokens, **decoding},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def cache_files(path: Path) -> list[Path]:
    """The cache file and the per-rank files written beside it (`<stem>.rank<r><suffix>`)."""
    return [path, *sorted(path.parent.glob(f"{path.stem}.rank*{path.suffix}"))]


def rank_file(path: Path, rank: int, world: int) -> Path:
    """Where rank `rank` of `world` appends its generations (the cache file itself alone)."""
    return path if world <= 1 else path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


def read_caches(path: Path, reasons: dict[str, str] | None = None) -> dict[str, str]:
    """`read_cache` over the cache file and every per-rank file beside it."""
    out: dict[str, str] = {}
    for f in cache_files(path):
        out.update(read_cache(f, reasons))
    return out


def read_cache(path: Path, reasons: dict[str, str] | None = None) -> dict[str, str]:
    """key -> response of a cache file; a torn last line (killed write) is ignored.
    `reasons` (when given) receives key -> finish reason for the records that have one."""
    out: dict[str, str] = {}
    if not path.is_file():
        return out
    lines = path.read_text(encoding="utf-8").split("\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            out[str(row["key"])] = str(row["response"])
            if reasons is not None and row.get("finish_reason"):
                reasons[str(row["key"])] = str(row["finish_reason"])
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            if i == len(lines) - 1 or (i == len(lines) - 2 and not lines[-1]):
                logger.warning("seqkd cache %s: ignoring a torn last line", path)
                continue
            raise CacheError(
                f"seqkd cache {path} line {i + 1} is not a cache record ({exc}); delete the "
                "file to regenerate the teacher's answers."
            ) from exc
    return out


def _drop_torn_tail(path: Path) -> None:
    """Cut a partial last line (a write killed mid-line) so appended records start clean."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as fh:
            fh.truncate(data.rfind(b"\n") + 1)


def _append(path: Path, records: Sequence[dict[str, str]]) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def split_prompt(row: dict[str, Any], index: int) -> list[dict[str, str]]:
    """The messages before the row's last assistant message."""
    messages = row["messages"]
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None or last == 0:
        raise DataError(
            f"row {index + 1} has no prompt before an assistant message; seqkd needs "
            "rows with a user turn followed by an assistant turn."
        )
    return [dict(m) for m in messages[:last]]


def teacher_generations(
    rows: Sequence[dict[str, Any]],
    config: TrainConfig,
    tokenizer: Any,
    device: Any = None,
    reasons: list[str | None] | None = None,
    *,
    rank: int = 0,
    world: int = 1,
    wait: bool = True,
    poll: float = 2.0,
) -> list[str]:
    """teacher_ft's reply to each row's prompt, from the cache or generated (then cached).

    `reasons` (when given) receives each reply's finish reason (`stop`, `length`, or None for
    records cached before finish reasons were kept). With `world > 1` this process generates
    only every world-th missing prompt (from `rank` on) and then, with `wait`, polls the other
    ranks' files until every prompt is answered (without `wait` it returns what it has, for
    tests; missing answers are then empty strings)."""
    from tqdm.auto import tqdm

    if not config.teacher_ft:
        raise ConfigError(
            "config field 'teacher_ft' = None is not allowed: method 'seqkd' needs the "
            "finetuned teacher that writes the training responses (set teacher_ft=PATH)."
        )
    settings = generation_settings(config)
    prompts = [split_prompt(r, i) for i, r in enumerate(rows)]
    texts = generation.render_prompts(tokenizer, prompts)
    identity = teacher_identity(config.teacher_ft)
    keys = [cache_key(t, identity, settings) for t in texts]
    cache_file = method_arguments("seqkd", SeqKDArgs, config.method_args).cache_file  # type: ignore[attr-defined]
    path = Path(cache_file or Path(config.output_dir) / CACHE_NAME)
    finish: dict[str, str] = {}
    cached = read_caches(path, finish)
    missing: dict[str, int] = {}  # key -> first row with that prompt
    for i, k in enumerate(keys):
        if k not in cached and k not in missing:
            missing[k] = i
    # Each distinct prompt belongs to one rank by its place among all prompts (not among the
    # missing ones, which differ between ranks that read the files at different times).
    owner = {k: j % world for j, k in enumerate(dict.fromkeys(keys))}
    todo = {k: i for k, i in missing.items() if owner[k] == rank}
    logger.info(
        "seqkd: %d prompts, %d cached answers in %s, %d to generate%s",
        len(set(keys)),
        len(set(keys)) - len(missing),
        path,
        len(missing),
        f" ({len(todo)} by rank {rank} of {world})" if world > 1 else "",
    )
    out_path = rank_file(path, rank, world)
    if todo:
        model = (
            _vllm_teacher(config) if settings.backend == "vllm" else _load_teacher(config, device)
        )
        out_path.parent.mkdir(parents=True, exist_ok=True)
        _drop_torn_tail(out_path)
        items = list(todo.items())
        bar = tqdm(
            total=len(items), desc="seqkd: teacher generations", unit="prompt",
            disable=not config.progress,
        )  # fmt: skip
        try:
            for start in range(0, len(items), CHUNK):
                chunk = items[start : start + CHUNK]
                gens = generation.generate(
                    model, tokenizer, [prompts[i] for _, i in chunk], settings, progress=False
                )
                records = [
                    {"key": k, "prompt": texts[i], "response": g.text,
                     "finish_reason": g.finish_reason}
                    for (k, i), g in zip(chunk, gens, strict=True)
                ]  # fmt: skip
                _append(out_path, records)
                cached.update({r["key"]: r["response"] for r in records})
                finish.update({r["key"]: r["finish_reason"] for r in records})
                bar.update(len(chunk))
        finally:
            bar.close()
        if settings.backend == "vllm":
            model.close()
        del model
    if world > 1 and wait:
        _wait_for_ranks(path, keys, cached, finish, poll)
    if reasons is not None:
        reasons[:] = [finish.get(k) for k in keys]
    return [cached.get(k, "") for k in keys]


def _wait_for_ranks(
    path: Path, keys: Sequence[str], cached: dict[str, str], finish: dict[str, str], poll: float
) -> None:
    """Read the other ranks' files until every key is answered (logged once while waiting)."""
    import time

    said = False
    while missing := [k for k in keys if k not in cached]:
        if not said:
            logger.info("seqkd: waiting for %d answers from the other ranks", len(set(missing)))
            said = True
        time.sleep(poll)
        cached.update(read_caches(path, finish))


def _vllm_teacher(config: TrainConfig) -> Any:
    """A vLLM engine over teacher_ft with the `generation` section's settings (dtype: the
    section's, else the references' dtype)."""
    from deltakd.generation.vllm import VLLMEngine
    from deltakd.loading import reference_dtype

    _, vsettings = backend_from_section(config.generation)
    assert vsettings is not None
    if "dtype" not in config.generation:
        dtype = str(reference_dtype(config)).removeprefix("torch.")
        vsettings = dataclasses.replace(vsettings, dtype=dtype)
    return VLLMEngine(config.teacher_ft or "", vsettings)


def _load_teacher(config: TrainConfig, device: Any) -> Any:
    from deltakd.loading import choose_device, load_model, reference_dtype

    return load_model(config.teacher_ft or "", dtype=reference_dtype(config), role="teacher_ft",
                      device=device if device is not None else choose_device(config.device),
                      trust_remote_code=config.trust_remote_code, frozen=True)  # fmt: skip


@register_method
class SeqKD(SFT):
    """SFT on teacher_ft's (cached) responses to the training prompts."""

    name = "seqkd"
    args = SeqKDArgs

    def validate(self, config: TrainConfig) -> None:
        super().validate(config)
        if not config.teacher_ft:
            raise ConfigError(
                "config field 'teacher_ft' = None is not allowed: method 'seqkd' needs the "
                "finetuned teacher that writes the training responses (set teacher_ft=PATH)."
            )
        generation_settings(config)
        if backend_from_section(config.generation)[0] == "vllm":
            from deltakd.generation.vllm import check_head_size

            check_head_size(
                config.teacher_ft,
                what=f"teacher_ft={config.teacher_ft!r} (generation.backend=vllm writes its replies)",
                trust_remote_code=config.trust_remote_code,
            )

    def prepare_rows(self, rows: list[dict], trainer_ctx: Any) -> list[dict]:
        from deltakd.data.vocab import check_vocabulary
        from deltakd.train.api import training_arguments

        config: TrainConfig = trainer_ctx["config"]
        tokenizer = trainer_ctx["tokenizer"]
        check_vocabulary(
            tokenizer, {"teacher_ft": config.teacher_ft or ""},
            trust_remote_code=config.trust_remote_code,
        )  # fmt: skip
        args = training_arguments(config)
        # Every rank generates its share and reads the others' (module docstring).
        reasons: list[str | None] = []
        replies = teacher_generations(
            rows, config, tokenizer, device=args.device, reasons=reasons,
            rank=args.process_index, world=args.world_size,
        )  # fmt: skip
        keep_truncated = method_arguments("seqkd", SeqKDArgs, config.method_args).keep_truncated  # type: ignore[attr-defined]
        out = []
        dropped = 0
        for i, (row, reply, reason) in enumerate(zip(rows, replies, reasons, strict=True)):
            if reason == "length" and not keep_truncated:
                dropped += 1  # the reply hit max_new_tokens: an unfinished answer
                continue
            new = dict(row)
            new["messages"] = [*split_prompt(row, i), {"role": "assistant", "content": reply}]
            out.append(new)
        if dropped:
            logger.warning(
                "seqkd: dropped %d of %d teacher replies that hit max_new_tokens=%d "
                "(method_args.keep_truncated=true keeps them)",
                dropped, len(rows), config.max_new_tokens,
            )  # fmt: skip
        if not out:
            raise DataError(
                f"seqkd: every teacher reply hit max_new_tokens={config.max_new_tokens}; raise "
                "max_new_tokens or set method_args.keep_truncated=true."
            )
        self.dropped_truncated = dropped
        return out
