"""Reference models loaded into the training process (small models, tests, single GPU).

Each frozen role is an `AutoModelForCausalLM` in eval mode with gradients off. `fetch` runs
them on the batch and returns full logits ([B, T, V_model]; the trainer slices to the shared
vocabulary) — float32 also for a bf16 / fp16 model, whose last hidden states are multiplied by
its lm_head with the product kept in float32 (`LogitHead.float32_logits`). There is nothing to prefetch: the computation happens in `fetch`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

import torch

from deltakd.errors import ConfigError
from deltakd.heads import UnsupportedHeadError, logit_head
from deltakd.loading import load_model, parse_dtype
from deltakd.losses.heads import LogitHead
from deltakd.references.base import REFERENCE_ROLES, ReferenceBatch, ReferenceSource

__all__ = ["LocalReferences", "parse_dtype"]

log = logging.getLogger(__name__)


def _is_16bit(model: torch.nn.Module) -> bool:
    # A wrapper (the LoRA student's adapter-disabled base as student_raw) names its model.
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    get_head = getattr(base, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return head is not None and head.weight.dtype in (torch.bfloat16, torch.float16)


class LocalReferences(ReferenceSource):
    """Frozen roles as in-process models.

    Args:
        paths: role -> model path or Hub name (roles from `REFERENCE_ROLES`).
        dtype: `fp32` / `bf16` / `fp16` or a torch dtype.
        device: where the models run (the student's device).
        models: already-loaded models to use instead of loading (role -> module), for tests and
            for sharing one model between roles.
        hidden_states: answer with last hidden states ([B, T, H]) and `lm_heads()` instead of
            logits, for the fused loss, which makes logits one chunk at a time (a hidden state is
            ~40× smaller than a 152k-vocabulary logit row). `lm_heads()` holds each model's
            output layer as `deltakd.heads.logit_head` describes it (bias, scale, soft cap);
            a model whose output layer it cannot reproduce still answers with logits.
    """

    def __init__(
        self,
        paths: Mapping[str, str] | None = None,
        *,
        dtype: str | torch.dtype = "fp32",
        device: str | torch.device = "cpu",
        trust_remote_code: bool = False,
        models: Mapping[str, torch.nn.Module] | None = None,
        hidden_states: bool = False,
    ) -> None:
        self.device = torch.device(device)
        self.dtype = parse_dtype(dtype, what="reference dtype")
        self.models: dict[str, torch.nn.Module] = dict(models or {})
        for role, path in (paths or {}).items():
            if role not in REFERENCE_ROLES:
                raise ConfigError(
                    f"unknown reference role {role!r}: expected one of "
                    f"{', '.join(REFERENCE_ROLES)}."
                )
            if role in self.models:
                continue
            self.models[role] = load_model(path, dtype=self.dtype, device=self.device, role=role,
                                           trust_remote_code=trust_remote_code)  # fmt: skip
        for model in self.models.values():
            model.eval()
            model.requires_grad_(False)
        self.roles = tuple(self.models)
        self._heads: dict[str, LogitHead] = {}
        # 16-bit models answering logits: their product is kept in float32 (rounded to 16 bits,
        # as the model's own lm_head does, the Delta-KD target loses 1.4e-3 nats/token in bf16;
        # docs/BENCHMARKS.md "Precision"), where deltakd can reproduce the output layer.
        self._float32_heads: dict[str, LogitHead] = {}
        for role, model in self.models.items():
            if not hidden_states and not _is_16bit(model):
                continue
            try:
                head = logit_head(model, fix="It answers with logits instead.")
            except UnsupportedHeadError as exc:
                # Logits from the model's own forward are always right, only larger.
                if hidden_states:
                    log.warning("role %s: %s", role, exc)
                continue
            (self._heads if hidden_states else self._float32_heads)[role] = head

    @torch.no_grad()
    def fetch(self, key: int, batch: Mapping[str, torch.Tensor]) -> ReferenceBatch:
        start = time.perf_counter()
        input_ids = batch["input_ids"].to(self.device)
        attention_mask = batch["attention_mask"].to(self.device)
        logits, hidden = {}, {}
        for role, model in self.models.items():
            if role in self._heads:
                out = model.base_model(
                    input_ids=input_ids, attention_mask=attention_mask, use_cache=False
                )
                hidden[role] = out.last_hidden_state
            elif role in self._float32_heads:
                out = model.base_model(
                    input_ids=input_ids, attention_mask=attention_mask, use_cache=False
                )
                logits[role] = self._float32_heads[role].float32_logits(out.last_hidden_state)
            else:
                out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
                logits[role] = out.logits
        # Local references compute inside fetch, so all of it is time the trainer waited.
        return ReferenceBatch(
            logits=logits, hidden=hidden, wait_seconds=time.perf_counter() - start
        )

    def lm_heads(self) -> dict[str, LogitHead]:
        return dict(self._heads)

    def close(self) -> None:
        self.models.clear()
