"""Loading models and tokenizers, choosing devices and dtypes: one place for every caller.

The trainer's student, the local references, SeqKD's and MiniLLM's teachers, the cache
builder and evaluation all load through here, so a model path means the same everywhere:
`mini:<name>` (the shipped miniature world), a local directory, or a Hub name (optionally at a
`revision`). This module sits below `deltakd.train`, `deltakd.eval` and `deltakd.references`
(docs/ARCHITECTURE.md); it imports `deltakd.data.vocab` for path resolution and the tokenizer.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from deltakd.data.vocab import load_tokenizer, resolve_model_path
from deltakd.errors import ConfigError

if TYPE_CHECKING:
    import torch

#: The config's dtype names (`precision`, `reference_dtype`, server dtypes) -> torch dtype names.
DTYPE_NAMES: dict[str, str] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

__all__ = [
    "DTYPE_NAMES",
    "choose_device",
    "load_model",
    "load_tokenizer",
    "parse_dtype",
    "reference_dtype",
    "resolve_model_path",
]


def parse_dtype(name: str | torch.dtype, *, what: str = "dtype") -> torch.dtype:
    """`fp32` / `bf16` / `fp16` (or the torch names `float32`, ...) -> the torch dtype;
    `what` names the setting in the error."""
    import torch

    if isinstance(name, torch.dtype):
        return name
    torch_name = DTYPE_NAMES.get(name, name)
    if torch_name not in DTYPE_NAMES.values():
        raise ConfigError(
            f"{what} {name!r} is not allowed: expected one of {', '.join(DTYPE_NAMES)}."
        )
    return getattr(torch, torch_name)


def reference_dtype(config: Any) -> torch.dtype:
    """The dtype of the frozen models: `reference_dtype`, where `auto` follows `precision`
    (bf16/fp16 runs load references in that dtype, fp32 runs in fp32)."""
    name = config.reference_dtype
    return parse_dtype(config.precision if name == "auto" else name)


def choose_device(setting: str | None = "auto") -> torch.device:
    """`auto` (or None): this process's GPU (`cuda:LOCAL_RANK`) when CUDA is present, else the CPU; anything else as given (`cpu`, `cuda:1`)."""
    import torch

    if setting in (None, "auto"):
        if not torch.cuda.is_available():
            return torch.device("cpu")
        # Under torchrun / accelerate launch each process takes its own GPU, not all cuda:0.
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device(setting)


def load_model(
    path: str,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    role: str | None = None,
    frozen: bool = False,
    **from_pretrained_kwargs: Any,
) -> Any:
    """An `AutoModelForCausalLM` from `path` (see the module docstring for what a path is).

    Args:
        dtype: `fp32`/`bf16`/`fp16`, a torch dtype, `auto` (the checkpoint's) or None (fp32,
            the transformers default).
        device: where to move it; None leaves it on the CPU.
        revision: a Hub branch, tag or commit.
        role: the config field named in the error when loading fails (`teacher_ft`, ...).
        frozen: eval mode with gradients off (references, teachers).
        from_pretrained_kwargs: passed on (`attn_implementation`, ...: the config's
            `model_kwargs`); `dtype` there is used when `dtype` is None.
    """
    from transformers import AutoModelForCausalLM

    extra = dict(from_pretrained_kwargs)
    if dtype is None:
        dtype = extra.pop("dtype", None)
    else:
        extra.pop("dtype", None)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, **extra}
    if dtype is not None:
        kwargs["dtype"] = "auto" if dtype == "auto" else parse_dtype(dtype)
    if revision is not None:
        kwargs["revision"] = revision
    resolved = resolve_model_path(str(path))
    try:
        model = AutoModelForCausalLM.from_pretrained(resolved, **kwargs)
    except (OSError, ValueError) as exc:  # ValueError: a directory without a model
        if role is None:
            raise ConfigError(
                f"cannot load a model from {str(path)!r} ({exc}); pass a directory saved with "
                "save_pretrained (e.g. a run's final/ directory), mini:<role>, or a Hub name."
            ) from exc
        raise ConfigError(
            f"cannot load the {role} model from {str(path)!r}: {exc}. Set `{role}` to a model "
            "directory, mini:<role>, or a Hub name."
        ) from exc
    if device is not None:
        model = model.to(device)
    if frozen:
        model.eval().requires_grad_(False)
    return model
