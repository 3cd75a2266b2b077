"""Typed nested sections of the training config: `cache:`, `servers:`, `peft:` and `generation:`.

Each field is optional: unset means the consumer's default, which its help names (the cache
builder's `CacheSettings`, the teacher-server client). Types, allowed values and ranges are
checked here, when the config is read, with the `section.key` name in every refusal; the
sections read as mappings of what the user set, so the consumers receive exactly that.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from deltakd.config.fields import Section, at_least, bad, help_meta, positive
from deltakd.errors import ConfigError

_DTYPES = ("fp16", "bf16", "fp32")


def _opt(text: str, *, choices: tuple[str, ...] | None = None, default: str) -> Any:
    return field(default=None, metadata=help_meta(text, choices=choices, default_text=default))


@dataclass(eq=True)
class CacheSection(Section):
    """`references: cache` and `deltakd cache build` (docs/USAGE.md, 'Offline target cache')."""

    key: ClassVar[str] = "cache"

    dir: str | None = _opt("cache directory", default="`<output_dir>/target_cache`")
    k: int | str | None = _opt(
        "top-k entries kept per position (`V` = the whole vocabulary)", default="`64`"
    )
    tail_rank: int | None = _opt(
        "rank r of the tail model (0 = tail bucket only); costs r × value bytes per position",
        default="`0`",
    )
    tail_fit_positions: int | None = _opt(
        "response positions (from the first rows) the tail model is fitted on", default="`4096`"
    )
    value_dtype: str | None = _opt(
        "log-probabilities as `fp16`, `bf16`, `fp32`, or `q4`…`q8` (b-bit levels of (p/p_max)^(1/3); "
        "tail coefficients then int8)",
        choices=(*_DTYPES, "q4", "q5", "q6", "q7", "q8"),
        default="`fp16`",
    )
    index_dtype: str | None = _opt(
        "token ids: `uint16` (V ≤ 65536), `uint24`, `int32`, `auto` (the narrowest), or `packed` "
        "(each position's id set Elias–Fano coded; cache format version 2)",
        choices=("auto", "uint16", "uint24", "int32", "packed"),
        default="`auto`",
    )
    rows_per_shard: int | None = _opt("rows per shard file, the unit of resume", default="`1024`")
    batch_size: int | None = _opt(
        "rows per reference forward pass while building", default="`per_device_batch_size`"
    )
    source: str | None = _opt(
        "where the build gets the frozen models' outputs: `local` or `servers`",
        choices=("local", "servers"),
        default="`local`",
    )
    verify: bool | None = _opt(
        "check each shard's sha256 the first time a run reads it", default="`true`"
    )
    verify_dataset: bool | None = _opt(
        "tokenize the run's dataset at start and compare its hash with the cache's",
        default="`true`",
    )

    def validate(self) -> None:
        if isinstance(self.k, str) and self.k.upper() != "V":
            raise bad("cache.k", self.k, "an integer >= 1, or V for the whole vocabulary")
        if isinstance(self.k, int) and self.k < 0:
            raise bad("cache.k", self.k, "an integer >= 1, or V for the whole vocabulary")
        if self.tail_rank is not None and self.tail_rank < 0:
            raise bad("cache.tail_rank", self.tail_rank, "an integer >= 0 (0 = no tail model, "
                      "the tail is one bucket; e.g. 64)")  # fmt: skip
        for name in ("tail_fit_positions", "rows_per_shard", "batch_size"):
            if getattr(self, name) is not None:
                at_least(f"cache.{name}", getattr(self, name), 1)


@dataclass(eq=True)
class ServersSection(Section):
    """`references: servers` (docs/USAGE.md, 'Teacher servers'). The keys from `model` down
    set every role's server; `roles: {ROLE: {...}}` overrides them per role."""

    key: ClassVar[str] = "servers"

    timeout: float | None = _opt(
        "seconds to wait for one reply before the server counts as hung or dead", default="`60`"
    )
    start_timeout: float | None = _opt(
        "seconds a launched server may take to load its model", default="`300`"
    )
    restart: bool | None = _opt(
        "relaunch a launched server that died or hung and send its batches again",
        default="`false`",
    )
    max_restarts: int | None = _opt("restarts allowed per role over the run", default="`3`")
    max_inflight: int | None = _opt(
        "requests per role sent ahead and not yet fetched (prefetch depth)", default="`2`"
    )
    transport: str | None = _opt(
        "`shm` (same host), `frame` (ZeroMQ frames, any host), `cuda` (CUDA IPC), `auto` (shm "
        "for local endpoints, else frame)",
        choices=("auto", "shm", "frame", "cuda"),
        default="`auto`",
    )
    zero_copy: bool | None = _opt(
        "read replies as views into the shared-memory slots instead of private copies",
        default="`true`",
    )
    threads: int | None = _opt("torch CPU threads of launched servers", default="torch's default")
    run_id: str | None = _opt("names this run's shared memory and sockets", default="random")
    cuda_device: str | None = _opt(
        "the GPU the trainer receives CUDA IPC tensors on", default="the student's device"
    )
    curve_client_key: str | None = _opt(
        "this client's CURVE `.key_secret` file, for servers with `curve_server_key`",
        default="none",
    )
    placement: str | None = _opt(
        "servers launched by the run: `per_rank` (every rank its own set; see `device`) or "
        "`shared` (one set per node, launched by local rank 0, used by every rank)",
        choices=("per_rank", "shared"),
        default="`per_rank`",
    )
    model: str | None = _opt(
        "model a launched server loads (and where hidden-state mode reads the lm_head)",
        default="the role's path in the config",
    )
    endpoint: str | None = _opt("ZeroMQ address of a running server", default="none (launch one)")
    device: str | None = _opt(
        "device of a launched server; `{local_rank}` / `{local_rank+N}` is this rank's, e.g. "
        "`cuda:{local_rank+1}`",
        default="`cpu`",
    )
    output: str | None = _opt(
        "`logits`, `hidden` (last hidden states; the trainer applies the lm_head) or `auto` "
        "(hidden for the families deltakd reproduces, else logits)",
        choices=("logits", "hidden", "auto"),
        default="`auto` with `fused_loss`, else `logits`",
    )
    dtype: str | None = _opt("dtype on the wire", choices=_DTYPES, default="`bf16`")
    launch: bool | None = _opt("start the server here", default="`true` without an endpoint")
    revision: str | None = _opt(
        "Hub branch, tag or commit of `model`", default="the default branch"
    )
    model_dtype: str | None = _opt(
        "dtype a launched server loads its weights in", choices=_DTYPES,
        default="`reference_dtype`",
    )  # fmt: skip
    batch_window_ms: float | None = _opt(
        "milliseconds a launched server waits after a request for other ranks' requests, to "
        "run those of equal length as one forward (useful with `placement: shared`)",
        default="`0`",
    )
    curve_server_key: str | None = _opt(
        "the running server's public CURVE `.key` file", default="none"
    )
    fault: str | None = _opt("fault injection, for the reliability tests only", default="none")
    roles: dict[str, Any] | None = field(
        default=None,
        metadata=help_meta(
            "per-role settings: `roles.<role>.<key>` with the keys from `model` down",
            default_text="none",
        ),
    )

    def validate(self) -> None:
        if self.batch_window_ms is not None:
            at_least("servers.batch_window_ms", self.batch_window_ms, 0)
        for name in ("timeout", "start_timeout"):
            if getattr(self, name) is not None:
                positive(f"servers.{name}", getattr(self, name))
        for name, lo in (("max_restarts", 0), ("max_inflight", 1), ("threads", 1)):
            if getattr(self, name) is not None:
                at_least(f"servers.{name}", getattr(self, name), lo)
        for role, entry in (self.roles or {}).items():
            if not isinstance(entry, dict):
                raise bad(f"servers.roles.{role}", entry, "a mapping of server settings")


@dataclass(eq=True)
class PeftSection(Section):
    """`peft:` trains LoRA adapters (through the `peft` library) instead of the whole student.

    Set `r` to turn it on. For Delta-KD, when `student_raw` is the student's own starting point,
    the `student_raw` logits come from the student with its adapters disabled (one no-grad
    forward of the model already in memory) instead of a third frozen model.
    """

    key: ClassVar[str] = "peft"

    r: int | None = _opt("LoRA rank; setting it turns LoRA on", default="none (full finetuning)")
    alpha: float | None = _opt("LoRA scaling α (`lora_alpha`)", default="`2 × r`")
    dropout: float | None = _opt("dropout on the LoRA input (`lora_dropout`)", default="`0`")
    target_modules: list[str] | str | None = field(
        default=None,
        metadata=help_meta(
            "module names (or `all-linear`) that get adapters",
            default_text="peft's per-model default",
        ),
    )
    merge: bool | None = _opt(
        "save `final/` as a full model with the adapters merged in (else the adapters alone)",
        default="`false`",
    )
    share_base: bool | None = _opt(
        "take `student_raw`'s logits from the student with adapters disabled when the student "
        "starts from `student_raw`",
        default="`true`",
    )

    @property
    def enabled(self) -> bool:
        return self.r is not None

    def validate(self) -> None:
        if self.r is not None:
            at_least("peft.r", self.r, 1)
        elif len(self):
            raise bad(
                "peft.r", None, "an integer >= 1 (the LoRA rank) when other peft keys are set"
            )
        if self.alpha is not None:
            positive("peft.alpha", self.alpha)
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise bad("peft.dropout", self.dropout, "a number in [0, 1)")

    def lora_config(self) -> Any:
        """The `peft.LoraConfig` of this section (a causal-LM task)."""
        try:
            from peft import LoraConfig
        except ModuleNotFoundError as exc:  # pragma: no cover - peft is a dependency
            raise ConfigError("peft: needs the `peft` package: `pip install peft`.") from exc
        assert self.r is not None
        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha if self.alpha is not None else 2 * self.r,
            lora_dropout=self.dropout or 0.0,
            target_modules=self.target_modules,
            task_type="CAUSAL_LM",
        )


#: generation backends (`deltakd.generation.BACKENDS` registers one function per name)
GENERATION_BACKENDS: tuple[str, ...] = ("hf", "vllm")
#: weight dtypes a vLLM engine accepts (`generation.dtype`, `deltakd.generation.vllm.VLLMSettings`)
VLLM_DTYPES: tuple[str, ...] = ("auto", "float32", "bfloat16", "float16")


@dataclass(eq=True)
class GenerationSection(Section):
    """`generation:` where SeqKD replies and on-policy samples are generated (docs/USAGE.md,
    'Generation on vLLM'): `backend` plus the vLLM engine's settings (`ENGINE_KEYS`, the
    fields of `deltakd.generation.vllm.VLLMSettings` a config may set). The one place where the
    section's names, types and choices are checked; the engine's ranges are `VLLMSettings`'.
    """

    key: ClassVar[str] = "generation"

    backend: str | None = _opt(
        "`hf` (transformers' generate) or `vllm` (a vLLM engine; `pip install 'deltakd[vllm]'`)",
        choices=GENERATION_BACKENDS,
        default="`hf`",
    )
    dtype: str | None = _opt("vLLM engine dtype", choices=VLLM_DTYPES, default="`auto`")
    max_model_len: int | None = _opt(
        "vLLM: prompt + reply tokens per sequence", default="the model's `max_position_embeddings`"
    )
    gpu_memory_utilization: float | None = _opt(
        "vLLM: fraction of GPU memory the engine may take", default="`0.9`"
    )
    kv_cache_gib: float | None = _opt(
        "vLLM: KV cache size in GiB instead of a memory fraction (always on CPU)",
        default="`0.5` on CPU",
    )
    tensor_parallel_size: int | None = _opt("vLLM: GPUs per engine", default="`1`")
    enforce_eager: bool | None = _opt(
        "vLLM: no CUDA graphs / compilation", default="true on CPU, false on GPU"
    )
    max_num_seqs: int | None = _opt("vLLM: sequences scheduled at once", default="vLLM's")

    def validate(self) -> None:
        engine = [k for k in ENGINE_KEYS if getattr(self, k) is not None]
        if engine and (self.backend or "hf") == "hf":
            raise ConfigError(
                f"config field '{self.key}.{engine[0]}' sets up the vLLM engine, but "
                f"'{self.key}.backend' is hf; set {self.key}.backend=vllm or remove it."
            )


#: the `generation:` keys besides `backend`: the vLLM engine's settings
ENGINE_KEYS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(GenerationSection) if f.name != "backend"
)


SECTIONS: dict[str, type[Section]] = {
    "cache": CacheSection,
    "servers": ServersSection,
    "peft": PeftSection,
    "generation": GenerationSection,
}
