"""Teacher servers at the paper's shapes: padded vocabularies, Hub names, placement, settings.

The models keep Qwen2.5's real vocabulary rows (152,064 / 151,936 lm_head rows, a 151,665-token
tokenizer) with 1 layer and a small hidden size (`tests/references/real_shape.py`). Servers run
in threads of the test process except where a launched process is the point (Hub names).
The multi-process variants (torchrun, 2 ranks) are in `test_server_torchrun.py` (slow).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from deltakd.errors import ConfigError, VocabularyError
from deltakd.references import shm
from deltakd.references.client import ServerReferences, ServerSpec, device_for_rank
from deltakd.references.local import LocalReferences
from deltakd.references.role_logits import RoleLogits
from deltakd.references.server import TeacherServer, local_model_dir
from tests.references import real_shape
from tests.references.test_server_client import running


@pytest.fixture(scope="module")
def qwen_shaped(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("qwen_shaped")
    return real_shape.build_world(root, roles=("teacher_ft", "student_raw"))


def _batch(seed: int, b: int = 2, t: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, real_shape.TOKENIZER_SIZE, (b, t), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _ep(tmp_path: Path, name: str) -> str:
    return f"ipc://{tmp_path}/{name}.sock"


@pytest.mark.parametrize("output", ["logits", "hidden"])
def test_padded_vocabularies_serve_exactly_what_local_references_do(
    qwen_shaped: dict, tmp_path: Path, output: str
) -> None:
    """152,064- and 151,936-row heads with one 151,665-token tokenizer: accepted (before, the
    client refused 'different vocabulary sizes'), and every role's logits over the tokenizer's
    vocabulary equal local references'."""
    roles = ("teacher_ft", "student_raw")
    servers = [
        TeacherServer.from_pretrained(
            r, str(qwen_shaped[r]), endpoint=_ep(tmp_path, r), output=output, dtype="fp32"
        )
        for r in roles
    ]
    assert [s.info["vocab_size"] for s in servers] == [152_064, 151_936]
    assert {s.info["tokenizer_size"] for s in servers} == {151_665}
    v = qwen_shaped["vocab_size"]
    local = LocalReferences({r: str(qwen_shaped[r]) for r in roles}, hidden_states=True)
    with running(servers[0]), running(servers[1]):
        specs = [ServerSpec(r, endpoint=s.endpoint, output=output, dtype="fp32",
                            model=str(qwen_shaped[r])) for r, s in zip(roles, servers)]  # fmt: skip
        with ServerReferences(specs, timeout=30) as refs:
            for k in range(2):
                batch = _batch(k)
                refs.prefetch(k, batch)
                got = RoleLogits(refs.fetch(k, batch), refs.lm_heads(), v, torch.device("cpu"))
                want = RoleLogits(local.fetch(k, batch), local.lm_heads(), v, torch.device("cpu"))
                for role in roles:
                    assert got.logits(role).shape == (2, 7, v)
                    torch.testing.assert_close(
                        got.logits(role), want.logits(role), atol=2e-5, rtol=1e-5
                    )
    assert shm.segments(refs.run_id) == []


def test_servers_with_different_tokenizers_are_refused(
    qwen_shaped: dict, tiny_world: dict, tmp_path: Path
) -> None:
    a = TeacherServer.from_pretrained(
        "teacher_ft", str(qwen_shaped["teacher_ft"]), endpoint=_ep(tmp_path, "a")
    )
    b = TeacherServer.from_pretrained(
        "student_raw", str(tiny_world["student_raw"]), endpoint=_ep(tmp_path, "b")
    )
    with running(a), running(b):
        specs = [ServerSpec("teacher_ft", endpoint=a.endpoint),
                 ServerSpec("student_raw", endpoint=b.endpoint)]  # fmt: skip
        with pytest.raises(VocabularyError, match=r"tokenizers differ.*same tokenizer"):
            ServerReferences(specs, timeout=30)


def test_one_shared_server_batches_the_requests_of_two_ranks(
    qwen_shaped: dict, tmp_path: Path
) -> None:
    """Two trainers (two clients, as two ranks of a node) send their batches within the
    server's batching window: one forward pass answers both, each gets its own rows."""
    from transformers import AutoModelForCausalLM

    path = str(qwen_shaped["teacher_ft"])
    server = TeacherServer.from_pretrained(
        "teacher_ft", path, endpoint=_ep(tmp_path, "t"), output="hidden", dtype="fp32",
        batch_window_ms=1000,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    spec = ServerSpec("teacher_ft", endpoint=server.endpoint, output="hidden", dtype="fp32")
    with running(server), ServerReferences([spec]) as rank0, ServerReferences([spec]) as rank1:
        batches = [_batch(10), _batch(11)]
        rank0.prefetch(0, batches[0])
        rank1.prefetch(0, batches[1])
        outs = [rank0.fetch(0, batches[0]), rank1.fetch(0, batches[1])]
        assert server.forwards == 1 and server._served == 1
        for batch, out in zip(batches, outs):
            with torch.no_grad():
                want = model.base_model(**batch).last_hidden_state
            torch.testing.assert_close(out.hidden["teacher_ft"], want, atol=1e-5, rtol=1e-5)
        # Different lengths cannot share a forward: each is answered alone.
        short = _batch(12, t=5)
        rank0.prefetch(1, batches[0])
        rank1.prefetch(1, short)
        rank0.fetch(1, batches[0])
        rank1.fetch(1, short)
        assert server.forwards == 3


def test_device_templates_map_local_ranks_to_devices() -> None:
    assert device_for_rank("cuda:{local_rank+1}", 2) == "cuda:3"
    assert device_for_rank("cuda:{local_rank}", 0) == "cuda:0"
    assert device_for_rank("cuda:{ local_rank + 4 }", 3) == "cuda:7"
    assert device_for_rank("cpu", 5) == "cpu"
    with pytest.raises(ConfigError, match=r"local_rank\+N"):
        device_for_rank("cuda:{rank}", 1)


def test_placement_is_checked() -> None:
    with pytest.raises(ConfigError, match=r"per_rank.*shared"):
        ServerReferences([ServerSpec("teacher_ft", endpoint="ipc:///nonexistent")],
                         placement="everywhere")  # fmt: skip


def test_run_settings_reach_launched_servers(
    tiny_world: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`reference_dtype` becomes the servers' weight dtype; `fused_loss` makes them answer
    hidden states (`auto`) unless `servers.output` says otherwise."""
    from deltakd.references import client
    from deltakd.train import load_config
    from tests.conftest import tiny_run_fields

    seen: list = []
    monkeypatch.setattr(client, "ServerReferences", lambda specs, **kw: seen.append((specs, kw)))
    base = {**tiny_run_fields(tiny_world, tmp_path / "d.jsonl"), "method": "delta_kd",
            "output_dir": str(tmp_path), "references": "servers"}  # fmt: skip
    roles = ("teacher_ft", "teacher_raw", "student_raw")
    cases = [
        ({"fused_loss": True, "reference_dtype": "bf16"}, "auto", "bf16"),
        ({"fused_loss": False}, "logits", "fp32"),
        ({"fused_loss": True, "servers": {"output": "logits", "model_dtype": "fp16"}}, "logits",
         "fp16"),
    ]  # fmt: skip
    for extra, output, dtype in cases:
        seen.clear()
        client.from_config(load_config(None, {**base, **extra}), roles, "cpu")
        (specs, _kw) = seen[0]
        assert {(s.output, s.model_dtype) for s in specs} == {(output, dtype)}, extra


def _hub_cache(root: Path, repo: str, source: Path, rev: str = "a" * 40) -> Path:
    """`source`'s files in the layout huggingface_hub's cache uses (HF_HOME/hub/...)."""
    org, name = repo.split("/")
    entry = root / "hub" / f"models--{org}--{name}"
    snapshot = entry / "snapshots" / rev
    shutil.copytree(source, snapshot)
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(rev)
    return snapshot


def test_hub_names_resolve_offline_from_the_cache(
    tiny_world: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A launched server loads `org/name` from the Hugging Face cache with HF_HUB_OFFLINE=1
    (before, it wanted a local directory), and the client reads that role's lm_head from the
    same cache for hidden-state mode."""
    import huggingface_hub.constants as hub_constants
    from transformers import AutoModelForCausalLM

    home = tmp_path / "hf"
    _hub_cache(home, "deltakd-test/tiny-teacher", Path(tiny_world["teacher_ft"]))
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    # This process imported huggingface_hub already: point its constants at the same cache.
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    spec = ServerSpec("teacher_ft", model="deltakd-test/tiny-teacher", output="hidden",
                      dtype="fp32", revision="main")  # fmt: skip
    v = tiny_world["vocab_size"]
    model = AutoModelForCausalLM.from_pretrained(tiny_world["teacher_ft"]).eval()
    with ServerReferences([spec], threads=1, start_timeout=120) as refs:
        assert "models--deltakd-test--tiny-teacher" in refs.info("teacher_ft")["model_path"]
        batch = {"input_ids": torch.randint(0, v, (2, 9))}
        got = RoleLogits(refs.fetch(0, batch), refs.lm_heads(), v, torch.device("cpu"))
        with torch.no_grad():
            want = model(**batch).logits[:, :-1, :v]
        torch.testing.assert_close(got.logits("teacher_ft"), want, atol=1e-5, rtol=1e-5)
    # Not in the cache: a clear refusal naming the cache, not a network retry loop.
    with pytest.raises(ConfigError, match=r"cannot find the model 'deltakd-test/absent'.*HF_HOME"):
        local_model_dir("deltakd-test/absent", role="teacher_ft")


def test_shared_placement_launches_once_and_both_ranks_survive_a_kill(tiny_world: dict) -> None:
    """Single-process variant of the torchrun test: two clients as local ranks 0 and 1 of one
    node. Rank 0 launches the one server; rank 1 uses it. After a SIGKILL, each rank notices
    (rank 1 by the server's pid), rank 0 restarts it, rank 1 reconnects; no segment is left."""
    import os
    import signal
    import threading
    import time

    from transformers import AutoModelForCausalLM

    path = str(tiny_world["teacher_ft"])
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    v = tiny_world["vocab_size"]
    spec = ServerSpec("teacher_ft", model=path, dtype="fp32")
    kw = {"placement": "shared", "run_id": f"t{os.getpid()}", "restart": True, "threads": 1,
          "timeout": 20, "start_timeout": 120}  # fmt: skip
    with ServerReferences([spec], local_rank=0, **kw) as rank0, \
            ServerReferences([spec], local_rank=1, **kw) as rank1:  # fmt: skip
        proc = rank0._conns["teacher_ft"].proc
        assert proc is not None and rank1._conns["teacher_ft"].proc is None
        assert rank1.info("teacher_ft")["pid"] == proc.pid
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        batches = [{"input_ids": torch.randint(0, v, (2, 7))} for _ in range(2)]
        got: dict = {}
        # Rank 1 asks first and waits; it must notice the dead server by itself and wait for
        # rank 0 (another thread here, another process under torchrun) to restart it.
        waiter = threading.Thread(target=lambda: got.update(r1=rank1.fetch(1, batches[1])))
        waiter.start()
        time.sleep(1.5)
        got["r0"] = rank0.fetch(0, batches[0])
        waiter.join(60)
        for k, (name, refs) in enumerate((("r0", rank0), ("r1", rank1))):
            with torch.no_grad():
                want = model(**batches[k]).logits
            torch.testing.assert_close(got[name].logits["teacher_ft"], want, atol=1e-5, rtol=1e-5)
            assert refs._conns["teacher_ft"].restarts == 1
        assert rank1.info("teacher_ft")["pid"] == rank0._conns["teacher_ft"].proc.pid != proc.pid
    assert shm.segments(rank0.run_id) == []
