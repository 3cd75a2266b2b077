"""Teacher servers and `ServerReferences`: exact outputs, refused replies, faults, security.

Most servers here run in a thread of the test process (same code path as `deltakd serve`,
without paying a second transformers import); one test launches real server processes to
kill and restart them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import zmq

from deltakd.errors import ConfigError, ReferenceServerError
from deltakd.references import shm, wire
from deltakd.references.client import ServerReferences, ServerSpec
from deltakd.references.server import TeacherServer
from tests.conftest import tiny_run_fields


@contextlib.contextmanager
def running(server: TeacherServer) -> Iterator[TeacherServer]:
    ready = threading.Event()
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_ms": 20, "ready": ready.set}, daemon=True
    )
    thread.start()
    assert ready.wait(10), "server thread did not bind"
    try:
        yield server
    finally:
        server.stop()
        thread.join(10)


@pytest.fixture(scope="module")
def models(tiny_world: dict) -> dict:
    from transformers import AutoModelForCausalLM

    out = {}
    for role in ("teacher_ft", "student_raw"):
        out[role] = AutoModelForCausalLM.from_pretrained(tiny_world[role]).eval()
    return out


def _batch(seed: int, vocab: int, b: int = 2, t: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding on one row
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def _expected(model, batch: dict, dtype=torch.bfloat16) -> torch.Tensor:
    return model(**batch).logits.to(dtype)


def _server(tiny_world: dict, role: str, endpoint: str, **kw) -> TeacherServer:
    return TeacherServer.from_pretrained(role, str(tiny_world[role]), endpoint=endpoint, **kw)


def _ep(tmp_path: Path, name: str) -> str:
    return f"ipc://{tmp_path}/{name}.sock"


@pytest.mark.parametrize("transport", ["shm", "frame"])
def test_pipelined_fetch_matches_the_model_exactly(
    tiny_world: dict, models: dict, tmp_path: Path, transport: str
) -> None:
    vocab = tiny_world["vocab_size"]
    ep_t, ep_s = _ep(tmp_path, "t"), _ep(tmp_path, "s")
    with (
        running(_server(tiny_world, "teacher_ft", ep_t)),
        running(_server(tiny_world, "student_raw", ep_s, output="hidden", dtype="fp32")),
    ):
        refs = ServerReferences(
            [
                ServerSpec("teacher_ft", endpoint=ep_t),
                ServerSpec("student_raw", endpoint=ep_s, output="hidden", dtype="fp32"),
            ],
            transport=transport,
            timeout=20,
        )
        with refs:
            assert refs.info("teacher_ft")["vocab_size"] == vocab
            batches = [_batch(k, vocab) for k in range(4)]
            refs.prefetch(0, batches[0])
            held = []
            for k, batch in enumerate(batches):
                if k + 1 < len(batches):
                    refs.prefetch(k + 1, batches[k + 1])  # batch k+1 while "training" on k
                out = refs.fetch(k, batch)
                held.append(out)  # keep zero-copy views alive across later fetches
                assert torch.equal(out.logits["teacher_ft"], _expected(models["teacher_ft"], batch))
                head = refs.lm_heads()["student_raw"]  # LogitHead: [V, H] weight, no bias
                assert head.bias is None and head.scale == 1.0 and head.softcap is None
                logits = head.apply(out.hidden["student_raw"])
                ref = _expected(models["student_raw"], batch, torch.float32)
                torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)
                assert out.wait_seconds >= 0.0
            # earlier replies are untouched by later ones (slots are not reused while held)
            for k, out in enumerate(held):
                assert torch.equal(
                    out.logits["teacher_ft"], _expected(models["teacher_ft"], batches[k])
                )
            run = refs.run_id
        assert shm.segments(run) == []


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("wrong_fp", r"refused the reply.*fingerprint.*answered for another batch"),
        ("malformed", r"malformed message header"),
    ],
)
def test_reply_for_another_batch_or_malformed_is_refused(
    tiny_world: dict, tmp_path: Path, fault: str, message: str
) -> None:
    ep = _ep(tmp_path, "w")
    with (
        running(_server(tiny_world, "teacher_ft", ep, fault=fault)),
        ServerReferences([ServerSpec("teacher_ft", endpoint=ep)], timeout=10) as refs,
        pytest.raises(ReferenceServerError, match=message) as err,
    ):
        refs.fetch(0, _batch(0, tiny_world["vocab_size"]))
    assert "'teacher_ft'" in str(err.value) and ep in str(err.value)


def _fake_server(endpoint: str, stop: threading.Event, rid_shift: int, info: dict) -> None:
    """Answers info correctly, then every forward with a shifted request id."""
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.bind(endpoint)
    try:
        while not stop.is_set():
            if not sock.poll(20):
                continue
            ident, *frames = sock.recv_multipart()
            header, _ = wire.decode(frames)
            if header["op"] == "info":
                reply = wire.encode({"op": "info", "rid": header["rid"], **info})
            else:
                out = torch.zeros(2, 12, info["vocab_size"], dtype=torch.bfloat16)
                spec = wire.tensor_spec("out", out, where="frame")
                head = {"op": "result", "rid": header["rid"] + rid_shift, "fp": header["fp"]}
                reply = wire.encode(
                    {**head, "role": "teacher_ft", "tensors": [spec]}, [wire.tensor_buffer(out)]
                )
            sock.send_multipart([ident, *reply], copy=False)
    finally:
        sock.close(linger=0)


def test_reply_with_unknown_request_id_is_refused(tmp_path: Path) -> None:
    ep = _ep(tmp_path, "f")
    stop = threading.Event()
    info = {"role": "teacher_ft", "output": "logits", "vocab_size": 50, "hidden_size": 8}
    thread = threading.Thread(target=_fake_server, args=(ep, stop, 1000, info), daemon=True)
    thread.start()
    try:
        with ServerReferences(
            [ServerSpec("teacher_ft", endpoint=ep)], timeout=1.0, transport="frame"
        ) as refs:
            t0 = time.monotonic()
            with pytest.raises(ReferenceServerError) as err:
                refs.fetch(0, _batch(0, 50))
            assert time.monotonic() - t0 < 5
            msg = str(err.value)
            assert "'teacher_ft'" in msg and ep in msg
            assert "matching no request were refused" in msg
    finally:
        stop.set()
        thread.join(5)


def test_hung_server_detected_within_timeout_with_clear_message(
    tiny_world: dict, tmp_path: Path
) -> None:
    ep = _ep(tmp_path, "h")
    with (
        running(_server(tiny_world, "teacher_ft", ep, fault="slow=1.5")),
        ServerReferences([ServerSpec("teacher_ft", endpoint=ep)], timeout=0.5) as refs,
    ):
        t0 = time.monotonic()
        with pytest.raises(ReferenceServerError) as err:
            refs.fetch(0, _batch(0, tiny_world["vocab_size"]))
        assert time.monotonic() - t0 < 2.5
    msg = str(err.value)
    assert "'teacher_ft'" in msg and ep in msg and "did not answer within 0.5 s" in msg
    assert "Fix:" in msg and "timeout" in msg


def test_unauthenticated_peer_is_rejected(tiny_world: dict, tmp_path: Path) -> None:
    secret = b"0123456789abcdef0123456789abcdef"
    ep = "tcp://127.0.0.1:0"
    sock = zmq.Context.instance().socket(zmq.ROUTER)  # find a free loopback port
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    sock.close(linger=0)
    ep = f"tcp://127.0.0.1:{port}"
    server = _server(tiny_world, "teacher_ft", ep, secret=secret)
    with running(server):
        for wrong in (None, b"another-secret-of-32-bytes-xxxxx"):
            with pytest.raises(ReferenceServerError, match="authentication failed"):
                ServerReferences([ServerSpec("teacher_ft", endpoint=ep)], secret=wrong or b"")
        assert server.rejected == 2
        with ServerReferences([ServerSpec("teacher_ft", endpoint=ep)], secret=secret) as refs:
            out = refs.fetch(0, _batch(1, tiny_world["vocab_size"]))
            assert out.logits["teacher_ft"].shape == (2, 12, tiny_world["vocab_size"])


def test_non_loopback_bind_without_secret_is_refused(
    tiny_world: dict, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from deltakd.cli import main

    monkeypatch.delenv(wire.SECRET_ENV, raising=False)
    with pytest.raises(ConfigError, match=r"refusing to bind tcp://0\.0\.0\.0:5999"):
        _server(tiny_world, "teacher_ft", "tcp://0.0.0.0:5999")
    # The command refuses before it loads any weights.
    argv = ["serve", "--role", "teacher_ft", "--model", "/nonexistent"]
    assert main([*argv, "--endpoint", "tcp://0.0.0.0:5999"]) == 2
    err = capsys.readouterr().err
    assert "refusing to bind" in err and "DELTAKD_SERVER_SECRET" in err


def test_killed_server_is_detected_then_restarted_with_identical_outputs(
    tiny_world: dict, models: dict
) -> None:
    vocab = tiny_world["vocab_size"]
    spec = ServerSpec("teacher_ft", model=str(tiny_world["teacher_ft"]))
    refs = ServerReferences([spec], timeout=10, restart=False, threads=1, start_timeout=120)
    try:
        batches = [_batch(k, vocab) for k in range(3)]
        first = refs.fetch(0, batches[0]).logits["teacher_ft"].clone()
        assert torch.equal(first, _expected(models["teacher_ft"], batches[0]))
        proc = refs._conns["teacher_ft"].proc
        assert proc is not None
        # Kill first, then prefetch: the request is outstanding at a dead server. (Prefetching
        # first races: a quick server can answer before the kill lands.)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        refs.prefetch(1, batches[1])
        t0 = time.monotonic()
        with pytest.raises(ReferenceServerError) as err:
            refs.fetch(1, batches[1])
        assert time.monotonic() - t0 < 10
        msg = str(err.value)
        assert "'teacher_ft'" in msg and "exited with code -9" in msg and "restart" in msg
        # Now with restart: the outstanding batch is sent again, nothing lost or stale.
        refs.restart = True
        for k in (1, 2, 0):
            out = refs.fetch(k, batches[k]).logits["teacher_ft"]
            assert torch.equal(out, _expected(models["teacher_ft"], batches[k]))
        assert refs._conns["teacher_ft"].restarts == 1
        new_proc = refs._conns["teacher_ft"].proc
        assert new_proc is not None and new_proc.pid != proc.pid
    finally:
        refs.close()
    assert new_proc.poll() is not None  # close stopped the launched server
    assert shm.segments(refs.run_id) == []


def test_servers_settings_are_checked(tiny_world: dict) -> None:
    from deltakd.references.client import from_settings

    models = {"teacher_ft": str(tiny_world["teacher_ft"])}
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['timeuot'\]"):
        from_settings({"timeuot": 3}, models)
    with pytest.raises(ConfigError, match=r"roles \['teacher_raw'\] are not needed"):
        from_settings({"roles": {"teacher_raw": {"device": "cpu"}}}, models)
    with pytest.raises(ConfigError, match="neither a model path"):
        from_settings({}, {"teacher_ft": None})
    with pytest.raises(ConfigError, match="bf16, fp16, fp32"):
        from_settings({"dtype": "int8"}, models)
    with pytest.raises(ConfigError, match="transport"):
        from_settings({"transport": "carrier-pigeon"}, models)


@pytest.mark.slow
def test_training_with_servers_matches_local_references(tiny_world: dict, tmp_path: Path) -> None:
    import json

    from safetensors.torch import load_file

    from deltakd.train import load_config, train

    data = tmp_path / "train.jsonl"
    rows = [{"prompt": f"what is {i} plus {i}?", "response": f"it is {2 * i}."} for i in range(8)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = {
        **tiny_run_fields(tiny_world, data),
        "method": "delta_kd",
        "max_steps": 3,
        "shuffle": False,
    }
    local = train(load_config(None, {**base, "output_dir": str(tmp_path / "local")}))
    servers = train(
        load_config(
            None,
            {
                **base,
                "output_dir": str(tmp_path / "servers"),
                "references": "servers",
                "servers": {"dtype": "fp32", "threads": 1, "restart": True},
            },
        )
    )
    a = load_file(str(local.final_dir / "model.safetensors"))
    b = load_file(str(servers.final_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4)
    waits = [h["ref_wait_s"] for h in servers.history if "ref_wait_s" in h]
    assert len(waits) == 3


@pytest.mark.slow
def test_hung_server_sigstop_is_killed_and_restarted(tiny_world: dict, models: dict) -> None:
    spec = ServerSpec("teacher_ft", model=str(tiny_world["teacher_ft"]))
    with ServerReferences([spec], timeout=3, restart=True, threads=1) as refs:
        batch = _batch(5, tiny_world["vocab_size"])
        assert torch.equal(
            refs.fetch(0, batch).logits["teacher_ft"], _expected(models["teacher_ft"], batch)
        )
        old = refs._conns["teacher_ft"].proc
        assert old is not None
        os.kill(old.pid, signal.SIGSTOP)  # hung: alive but never answers
        t0 = time.monotonic()
        out = refs.fetch(1, batch).logits["teacher_ft"]
        assert torch.equal(out, _expected(models["teacher_ft"], batch))
        assert refs._conns["teacher_ft"].restarts == 1
        assert old.poll() is not None  # the hung process was killed, not left behind
        assert time.monotonic() - t0 < 3 + 120  # timeout + one model start


def _free_port() -> int:
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    try:
        return sock.bind_to_random_port("tcp://127.0.0.1")
    finally:
        sock.close(linger=0)


def test_curve_keys_admit_known_clients_and_reject_others(tiny_world: dict, tmp_path: Path) -> None:
    import zmq.auth

    for d in ("server", "keys", "allowed", "stranger"):
        (tmp_path / d).mkdir()
    server_public, server_secret = zmq.auth.create_certificates(tmp_path / "server", "server")
    client_public, good = zmq.auth.create_certificates(tmp_path / "keys", "trainer")
    # the server admits the public keys in this directory, and only those
    (tmp_path / "allowed" / "trainer.key").write_bytes(Path(client_public).read_bytes())
    _, stranger = zmq.auth.create_certificates(tmp_path / "stranger", "stranger")
    wire.require_safe_bind("tcp://0.0.0.0:5999", None, curve=True)  # CURVE alone is enough

    ep = f"tcp://127.0.0.1:{_free_port()}"
    server = _server(
        tiny_world, "teacher_ft", ep, curve_secret_key=server_secret,
        curve_clients=str(tmp_path / "allowed"),
    )  # fmt: skip
    spec = ServerSpec("teacher_ft", endpoint=ep, curve_server_key=server_public)
    with running(server):
        with ServerReferences([spec], curve_client_key=good, timeout=10) as refs:
            out = refs.fetch(0, _batch(2, tiny_world["vocab_size"]))
            assert out.logits["teacher_ft"].shape[-1] == tiny_world["vocab_size"]
        with pytest.raises(ReferenceServerError, match=r"--curve-clients"):
            ServerReferences([spec], curve_client_key=stranger, timeout=1.0)
        with pytest.raises(ConfigError, match="curve_client_key"):
            ServerReferences([spec], timeout=1.0)


def test_port_already_in_use_gives_clear_error() -> None:
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    try:
        server = TeacherServer(
            "teacher_ft", lambda ids, mask: ids, info={}, endpoint=f"tcp://127.0.0.1:{port}"
        )
        with pytest.raises(ConfigError, match=r"cannot bind .*in use.*another port"):
            server.serve_forever()
    finally:
        sock.close(linger=0)


def test_log_dirs_of_dead_trainers_are_swept_when_stale(tmp_path):
    import os
    import subprocess
    import sys
    import time

    from deltakd.references.client import sweep_dead_log_dirs

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    dead_pid = int(dead.stdout)
    old = time.time() - 7200
    stale = tmp_path / f"deltakd-abc123-p{dead_pid}-x1"
    fresh = tmp_path / f"deltakd-abc123-p{dead_pid}-x2"
    alive = tmp_path / f"deltakd-abc123-p{os.getppid()}-x3"
    other = tmp_path / "deltakd-not-a-log-dir"
    for d in (stale, fresh, alive, other):
        d.mkdir()
        (d / "teacher_ft.log").write_text("log")
    for d in (stale, alive, other):
        os.utime(d, (old, old))
    assert sweep_dead_log_dirs(root=tmp_path) == [stale]
    assert not stale.exists() and fresh.exists() and alive.exists() and other.exists()
    # Once old enough, the fresh one goes too.
    os.utime(fresh, (old, old))
    assert sweep_dead_log_dirs(root=tmp_path) == [fresh]


def test_every_servers_setting_is_documented_in_usage():
    from pathlib import Path

    from deltakd.references.client import CLIENT_KEYS, ROLE_KEYS

    usage = (Path(__file__).parents[2] / "docs" / "USAGE.md").read_text(encoding="utf-8")
    keys = [k for k in (*CLIENT_KEYS, *ROLE_KEYS) if k != "fault"]  # fault: tests only
    missing = [k for k in keys if f"`servers.{k}`" not in usage]
    assert not missing, f"docs/USAGE.md's servers table lacks {missing}"
