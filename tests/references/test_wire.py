"""Bit-exact round trips of every dtype and shape through each transport path."""

from __future__ import annotations

import pytest
import torch
import zmq

from deltakd.errors import ConfigError, ReferenceServerError
from deltakd.references import wire
from deltakd.references.shm import AttachedSegments, ShmRing, new_run_id

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool]
SHAPES = [(), (0,), (3,), (2, 3, 5), (1, 7, 1001)]


def _sample(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(hash((str(dtype), shape)) % 2**31)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype == torch.int64:
        return torch.randint(-(2**62), 2**62, shape, generator=g, dtype=torch.int64)
    x = torch.randn(shape, generator=g) * 1e3
    x = x.to(dtype)
    if x.numel() >= 3:  # specials must survive bit-exactly too
        x.view(-1)[:3] = torch.tensor([float("nan"), float("inf"), -0.0]).to(dtype)
    return x


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(wire.as_bytes(a), wire.as_bytes(b))
    )


@pytest.fixture(scope="module")
def zmq_pair(tmp_path_factory: pytest.TempPathFactory):
    ctx = zmq.Context.instance()
    endpoint = f"ipc://{tmp_path_factory.mktemp('wire')}/pair.sock"
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    a.bind(endpoint)
    b.connect(endpoint)
    b.setsockopt(zmq.RCVTIMEO, 5000)
    yield a, b
    a.close(linger=0)
    b.close(linger=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zero_copy_frames_round_trip_bit_exact(zmq_pair, dtype: torch.dtype) -> None:
    a, b = zmq_pair
    secret = b"s" * 32
    for shape in SHAPES:
        x = _sample(dtype, shape)
        a.send_multipart(
            wire.encode({"t": wire.tensor_spec("x", x)}, [wire.tensor_buffer(x)], secret),
            copy=False,
        )
        header, payload = wire.decode(b.recv_multipart(copy=False), secret)
        spec = header["t"]
        y = wire.from_buffer(payload[0].buffer, wire.dtype_from_name(spec["dtype"]), spec["shape"])
        assert _same_bits(x, y), (dtype, shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_shared_memory_ring_round_trip_bit_exact(dtype: torch.dtype) -> None:
    ring = ShmRing(new_run_id(), max_slots=2)
    writer = AttachedSegments()
    try:
        for shape in SHAPES:
            x = _sample(dtype, shape)
            for zero_copy in (True, False):
                slot = ring.lease(wire.nbytes_of(dtype, shape))
                dest = writer.tensor(slot.name, slot.offset, slot.capacity, dtype, shape)
                dest.copy_(x)
                del dest
                if zero_copy:
                    y = ring.view(slot, dtype, shape)
                else:
                    y = ring.copy_out(slot, dtype, shape)
                assert _same_bits(x, y), (dtype, shape, zero_copy)
                del y  # frees the slot (view) for the next round
    finally:
        writer.close()
        ring.close()


def test_non_contiguous_tensor_travels_as_its_values() -> None:
    x = torch.arange(12, dtype=torch.bfloat16).reshape(3, 4).t()  # a transposed view
    y = wire.from_buffer(bytearray(wire.tensor_buffer(x)), x.dtype, x.shape)
    assert torch.equal(x, y)


def test_fingerprint_changes_with_any_token_or_mask() -> None:
    ids = torch.randint(0, 100, (2, 8))
    mask = torch.ones_like(ids)
    fp = wire.fingerprint({"input_ids": ids, "attention_mask": mask})
    ids2 = ids.clone()
    ids2[1, 7] += 1
    mask2 = mask.clone()
    mask2[0, 0] = 0
    assert fp == wire.fingerprint({"input_ids": ids.clone(), "attention_mask": mask.clone()})
    assert fp != wire.fingerprint({"input_ids": ids2, "attention_mask": mask})
    assert fp != wire.fingerprint({"input_ids": ids, "attention_mask": mask2})
    assert fp != wire.fingerprint({"input_ids": ids.reshape(4, 4), "attention_mask": mask})


def test_forged_or_unsigned_message_is_rejected() -> None:
    frames = wire.encode({"op": "ping", "rid": 1}, (), b"k" * 32)
    with pytest.raises(wire.AuthenticationError, match="shared secret"):
        wire.decode(frames, b"x" * 32)
    with pytest.raises(wire.AuthenticationError):
        wire.decode(wire.encode({"op": "ping"}, (), None), b"k" * 32)
    with pytest.raises(ReferenceServerError, match="malformed"):
        wire.decode([b"\xc1garbage", b""], None)


@pytest.mark.parametrize(
    ("endpoint", "local"),
    [
        ("ipc:///tmp/x.sock", True),
        ("tcp://127.0.0.1:5555", True),
        ("tcp://localhost:5555", True),
        ("tcp://[::1]:5555", True),
        ("tcp://0.0.0.0:5555", False),
        ("tcp://*:5555", False),
        ("tcp://10.1.2.3:5555", False),
    ],
)
def test_non_loopback_bind_needs_a_secret(endpoint: str, local: bool) -> None:
    assert wire.is_local_endpoint(endpoint) is local
    wire.require_safe_bind(endpoint, b"k" * 32)  # a secret always allows it
    if local:
        wire.require_safe_bind(endpoint, None)
    else:
        with pytest.raises(ConfigError, match=r"secret.*(127\.0\.0\.1|ipc)"):
            wire.require_safe_bind(endpoint, None)


def test_wire_dtype_names() -> None:
    assert wire.wire_dtype("bf16") is torch.bfloat16
    assert wire.wire_dtype("fp32") is torch.float32
    with pytest.raises(ConfigError, match="bf16, fp16, fp32"):
        wire.wire_dtype("int8")
