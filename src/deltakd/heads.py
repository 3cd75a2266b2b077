"""Which "hidden → logits" transform each causal-LM family's forward applies.

The fused loss (`fused_loss: true`), hidden-state references (`output: hidden`) and the cache
builder make logits from last hidden states themselves. They are right only if they do exactly
what the model's forward does after its decoder. This module is the one place that says what
that is, as a `deltakd.losses.heads.LogitHead` (weight, bias, scale, soft cap), read from
`transformers`' modeling code (5.x; docs/USAGE.md "Model families checked"):

| family (model_type) | after the decoder's final norm |
|---|---|
| llama, mistral, mixtral, qwen2, qwen2_moe, qwen3, qwen3_moe, gemma, phi3, olmo, olmo2,
  smollm3, gpt_neox, falcon, starcoder2, stablelm | `h @ W.T` |
| phi | `h @ W.T + b` (the lm_head has a bias) |
| gemma2, gemma3_text | `c · tanh(h @ W.T / c)`, c = `final_logit_softcapping` (None: off) |
| granite, granitemoe | `h @ W.T / logits_scaling` |
| cohere, cohere2 | `h @ W.T · logit_scale` |

Any other family, remote code, or a config knob of the head this table does not know is
refused (`UnsupportedHeadError`) with the setting that avoids recomputing logits
(`fused_loss: false` for the student, `output: logits` for a teacher server): the dense path
uses the model's own forward and is always right.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from deltakd.errors import ConfigError
from deltakd.losses.heads import LogitHead


class UnsupportedHeadError(ConfigError):
    """deltakd cannot reproduce this model's hidden → logits transform."""


@dataclass(frozen=True)
class _Rule:
    """How one family's forward turns `h @ W.T (+ b)` into logits."""

    softcap: str | None = None  # config field of the final soft cap (None value: no cap)
    multiply: str | None = None  # config field the logits are multiplied by
    divide: str | None = None  # config field the logits are divided by


#: model_type → its rule. A family enters this table only with a test in
#: tests/test_logit_heads.py comparing the recomputed logits with the model's forward.
FAMILIES: dict[str, _Rule] = {
    "llama": _Rule(),
    "mistral": _Rule(),
    "mixtral": _Rule(),
    "qwen2": _Rule(),
    "qwen2_moe": _Rule(),
    "qwen3": _Rule(),
    "qwen3_moe": _Rule(),
    "gemma": _Rule(),
    "gemma2": _Rule(softcap="final_logit_softcapping"),
    "gemma3_text": _Rule(softcap="final_logit_softcapping"),
    "phi3": _Rule(),
    "phi": _Rule(),
    "olmo": _Rule(),
    "olmo2": _Rule(),
    "granite": _Rule(divide="logits_scaling"),
    "granitemoe": _Rule(divide="logits_scaling"),
    "cohere": _Rule(multiply="logit_scale"),
    "cohere2": _Rule(multiply="logit_scale"),
    "smollm3": _Rule(),
    "gpt_neox": _Rule(),
    "falcon": _Rule(),
    "starcoder2": _Rule(),
    "stablelm": _Rule(),
}

# Config fields that could change the output layer of a family not written above (soft caps,
# logit multipliers / divisors, muP output multipliers). Attention soft caps and router logits
# are inside the decoder, so they do not matter here.
_HEAD_KNOB = re.compile(
    r"(softcap|logit_scal|logits_scal|logit_mult|logits_mult|output_mult|lm_head_mult|"
    r"width_mult|mup)",
    re.IGNORECASE,
)
_INSIDE_DECODER = re.compile(r"(attn|attention|router|residual|embedding)", re.IGNORECASE)


def _neutral(value: Any) -> bool:
    """A knob left at a value that changes nothing (off, or a factor of 1)."""
    return value is None or value is False or (isinstance(value, (int, float)) and value == 1)


def _text_config(config: Any) -> Any:
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def _family(config: Any) -> str:
    # The top-level model_type: a multimodal wrapper (gemma3) is not its text family.
    return str(getattr(config, "model_type", None) or "unknown")


def _refuse(family: str, why: str, fix: str) -> UnsupportedHeadError:
    return UnsupportedHeadError(
        f"{family}: {why}, so deltakd cannot recompute its logits from hidden states exactly "
        f"(families it can: {', '.join(sorted(FAMILIES))}). {fix}"
    )


def head_transform(config: Any, *, fix: str = "Set `fused_loss: false`.") -> dict[str, Any]:
    """`{"family", "scale", "softcap"}` of a model config's output layer (bias and weight are
    the module's). Raises `UnsupportedHeadError` naming the family and `fix` when unknown."""
    cfg = _text_config(config)
    family = _family(config)
    rule = FAMILIES.get(family)
    if rule is None:
        raise _refuse(family, "this model family has not been checked", fix)
    known = {rule.softcap, rule.multiply, rule.divide} - {None}
    for key, value in cfg.to_dict().items():
        if key in known or not _HEAD_KNOB.search(key) or _INSIDE_DECODER.search(key):
            continue
        if not _neutral(value):
            raise _refuse(family, f"its config sets {key}={value!r}, unknown to deltakd", fix)
    scale = 1.0
    if rule.multiply is not None:
        scale *= float(getattr(cfg, rule.multiply))
    if rule.divide is not None:
        scale /= float(getattr(cfg, rule.divide))
    softcap = getattr(cfg, rule.softcap, None) if rule.softcap is not None else None
    return {
        "family": family,
        "scale": scale,
        "softcap": None if softcap is None else float(softcap),
    }


def logit_head(model: torch.nn.Module, *, fix: str = "Set `fused_loss: false`.") -> LogitHead:
    """The `LogitHead` of a loaded causal LM: its output layer's weight and bias (the
    parameters themselves, so a student's head receives gradients) with its family's scale and
    soft cap. Raises `UnsupportedHeadError` for a model it cannot reproduce."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    family = _family(base.config)
    module = type(base).__module__
    if not module.startswith("transformers."):
        raise _refuse(family, f"its code is not transformers' own ({module})", fix)
    described = head_transform(base.config, fix=fix)
    head = base.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise _refuse(family, f"its output layer is a {type(head).__name__}", fix)
    return LogitHead(
        head.weight,
        head.bias,
        scale=described["scale"],
        softcap=described["softcap"],
        family=family,
    )


__all__ = ["FAMILIES", "UnsupportedHeadError", "head_transform", "logit_head"]
