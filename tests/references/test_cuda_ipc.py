"""CUDA IPC between a GPU teacher server and the trainer (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from deltakd.references.client import ServerReferences, ServerSpec

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_export_import_round_trip_in_process() -> None:
    from deltakd.references import cuda_ipc

    x = torch.randn(3, 5, 7, device="cuda").to(torch.bfloat16)
    handle = cuda_ipc.export_tensor(x)
    y = cuda_ipc.receive(handle)
    assert y.data_ptr() != x.data_ptr()  # a private copy
    assert torch.equal(x, y)


def test_gpu_server_answers_through_cuda_ipc_exactly(tiny_world: dict) -> None:
    from transformers import AutoModelForCausalLM

    path = str(tiny_world["teacher_ft"])
    model = AutoModelForCausalLM.from_pretrained(path).eval().to("cuda")
    spec = ServerSpec("teacher_ft", model=path, device="cuda:0")
    with ServerReferences([spec], transport="cuda", timeout=60, cuda_device="cuda:0") as refs:
        for k in range(3):
            ids = torch.randint(0, tiny_world["vocab_size"], (2, 16), generator=None)
            batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            refs.prefetch(k, batch)
            out = refs.fetch(k, batch).logits["teacher_ft"]
            assert out.device.type == "cuda"
            with torch.no_grad():
                ref = model(**{n: t.cuda() for n, t in batch.items()}).logits
            torch.testing.assert_close(out.float(), ref.to(torch.bfloat16).float())
        # released exports are dropped by the server on the next request
        assert refs._conns["teacher_ft"].cuda_release
