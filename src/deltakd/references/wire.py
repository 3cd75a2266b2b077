"""Wire format between the trainer and teacher servers.

A message is a ZeroMQ multipart message ``[header, mac, *payload]``:

- ``header``: a small msgpack map (request id, role, run id, batch fingerprint, and one tensor
  spec per tensor: name, dtype, shape, and where the bytes are);
- ``mac``: HMAC-SHA256 of the header bytes under a shared secret, or empty when none is set;
- ``payload``: raw tensor bytes, one frame per tensor, only for tensors that travel inside the
  message (``where == "frame"``). Tensors in shared memory or CUDA IPC carry only a location.

Nothing is pickled. Tensors are described by dtype name and shape and rebuilt from their raw
bytes, so a peer can never make the other side execute code. bfloat16 has no numpy dtype, so
tensors travel as their bytes (a ``uint8`` view of the same memory), which also makes every
dtype bit-exact.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import msgpack
import torch

from deltakd.errors import ConfigError, ReferenceServerError

PROTOCOL_VERSION = 1
SECRET_ENV = "DELTAKD_SERVER_SECRET"

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
# Short names the command line and configs accept for the wire dtype of logits.
WIRE_DTYPE_ALIASES: dict[str, str] = {
    "bf16": "bfloat16",
    "fp16": "float16",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "float16": "float16",
    "float32": "float32",
}


def wire_dtype(name: str) -> torch.dtype:
    """Map ``bf16|fp16|fp32`` (or the long names) to a torch dtype; ConfigError otherwise."""
    long = WIRE_DTYPE_ALIASES.get(str(name).lower())
    if long is None:
        raise ConfigError(
            f"wire dtype {name!r} is not supported; use one of bf16, fp16, fp32 "
            "(bf16 halves the bytes of fp32 and keeps its range)"
        )
    return DTYPES[long]


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise ConfigError(
            f"dtype {dtype} cannot travel on the wire; convert it to one of {sorted(DTYPES)}"
        ) from None


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ReferenceServerError(
            f"peer sent a tensor of unknown dtype {name!r}; both sides must run the same deltakd "
            "version (upgrade the older one)"
        ) from None


def nbytes_of(dtype: torch.dtype, shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty((), dtype=dtype).element_size()


# ----------------------------------------------------------------------------------------------
# tensors <-> bytes


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A flat ``uint8`` view of a CPU tensor's bytes (no copy when already contiguous).  # (N,)"""
    t = tensor.detach()
    if t.device.type != "cpu":
        raise ValueError("as_bytes needs a CPU tensor; move it or use the CUDA IPC transport")
    t = t.contiguous().reshape(-1)
    # A 1-element-size dtype (bool, int8) views as uint8 directly; wider dtypes expand to bytes.
    return t.view(torch.uint8)


def tensor_buffer(tensor: torch.Tensor) -> memoryview:
    """A memoryview of the tensor's bytes, for zero-copy ZeroMQ frames (``copy=False``)."""
    return memoryview(as_bytes(tensor).numpy())


def from_buffer(buffer: Any, dtype: torch.dtype, shape: Sequence[int], offset: int = 0) -> Any:
    """Wrap ``buffer`` bytes as a tensor of ``dtype``/``shape`` without copying.

    The tensor keeps ``buffer`` alive. Returns a tensor; an empty tensor is freshly allocated.
    """
    shape = tuple(int(s) for s in shape)
    nbytes = nbytes_of(dtype, shape)
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():
        # Non-writable buffers only warn; our buffers are writable or never written.
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(buffer, dtype=torch.uint8, count=nbytes, offset=offset)
    return flat.view(dtype).view(shape)


def fingerprint(batch: Mapping[str, torch.Tensor]) -> str:
    """blake2b of the batch's ``input_ids`` and ``attention_mask`` (shape and bytes); hex."""
    h = hashlib.blake2b(digest_size=16)
    for name in ("input_ids", "attention_mask"):
        t = batch.get(name)
        if t is None:
            h.update(b"-")
            continue
        t = t.detach().to("cpu", torch.int64).contiguous()
        h.update(repr(tuple(t.shape)).encode())
        h.update(as_bytes(t).numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# messages


def tensor_spec(name: str, tensor: torch.Tensor, **where: Any) -> dict[str, Any]:
    return {
        "name": name,
        "dtype": dtype_name(tensor.dtype),
        "shape": [int(s) for s in tensor.shape],
        **where,
    }


def sign(header: bytes, secret: bytes | None) -> bytes:
    if not secret:
        return b""
    return hmac.new(secret, header, hashlib.sha256).digest()


def encode(
    header: Mapping[str, Any], payload: Sequence[Any] = (), secret: bytes | None = None
) -> list[Any]:
    """Frames to send with ``socket.send_multipart(frames, copy=False)``."""
    head = msgpack.packb({"v": PROTOCOL_VERSION, **header}, use_bin_type=True)
    return [head, sign(head, secret), *payload]


class AuthenticationError(ReferenceServerError):
    """A message had no valid HMAC under the shared secret."""


def decode(frames: Sequence[Any], secret: bytes | None = None) -> tuple[dict[str, Any], list[Any]]:
    """Parse ``[header, mac, *payload]`` frames (``zmq.Frame`` or bytes).

    Returns the header and the payload frames untouched (still zero-copy).
    Raises AuthenticationError when a secret is set and the mac does not match.
    """
    if len(frames) < 2:
        raise ReferenceServerError(
            f"malformed message: {len(frames)} frame(s), expected at least 2 (header, mac); "
            "the peer is not a deltakd endpoint or runs another version"
        )
    head = _bytes(frames[0])
    if secret:
        mac = _bytes(frames[1])
        if not hmac.compare_digest(mac, sign(head, secret)):
            raise AuthenticationError(
                "authentication failed: the message is not signed with this server's shared "
                f"secret; give both sides the same secret (env {SECRET_ENV} or --secret-file)"
            )
    try:
        header = msgpack.unpackb(head, raw=False, strict_map_key=True)
    except Exception as exc:
        raise ReferenceServerError(
            f"malformed message header ({exc}); the peer is not a deltakd endpoint or runs "
            "another version"
        ) from None
    if not isinstance(header, dict) or header.get("v") != PROTOCOL_VERSION:
        got = header.get("v") if isinstance(header, dict) else None
        raise ReferenceServerError(
            f"protocol version {got!r} does not match this side's {PROTOCOL_VERSION}; run the "
            "same deltakd version on trainer and servers"
        )
    return header, list(frames[2:])


def _bytes(frame: Any) -> bytes:
    if isinstance(frame, bytes):
        return frame
    if hasattr(frame, "bytes"):
        return frame.bytes
    return bytes(frame)


# ----------------------------------------------------------------------------------------------
# endpoints and secrets

_LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1", "[::1]"}


def is_local_endpoint(endpoint: str) -> bool:
    """True for ``ipc://``, ``inproc://`` and ``tcp://`` on a loopback address."""
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    m = re.fullmatch(r"tcp://(\[[^\]]+\]|[^:]+):(\d+|\*)", endpoint)
    if not m:
        return False
    host = m.group(1)
    if host in _LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def load_secret(secret_file: str | os.PathLike[str] | None = None) -> bytes | None:
    """The shared secret from ``secret_file`` or env ``DELTAKD_SERVER_SECRET``; None if unset."""
    if secret_file:
        path = Path(secret_file)
        try:
            data = path.read_bytes().strip()
        except OSError as exc:
            raise ConfigError(
                f"cannot read the server secret file {path} ({exc.strerror}); create it with "
                "e.g. `python -c 'import secrets; print(secrets.token_hex(32))' > FILE`"
            ) from None
        if len(data) < 16:
            raise ConfigError(
                f"the server secret in {path} has {len(data)} bytes; use at least 16 random "
                "bytes (e.g. secrets.token_hex(32))"
            )
        return data
    env = os.environ.get(SECRET_ENV, "").strip()
    return env.encode() if env else None


def require_safe_bind(endpoint: str, secret: bytes | None, curve: bool = False) -> None:
    """Refuse to bind a non-loopback endpoint without a shared secret or CURVE keys."""
    if not is_local_endpoint(endpoint) and not secret and not curve:
        raise ConfigError(
            f"refusing to bind {endpoint}: it is reachable from other hosts and no shared secret "
            f"is set, so anyone could query the model. Bind ipc:// or tcp://127.0.0.1, or set a "
            f"secret on both sides (env {SECRET_ENV} or --secret-file FILE), or CURVE keys "
            "(--curve-secret-key and --curve-clients)"
        )


def load_curve_cert(path: str | os.PathLike[str], *, secret: bool) -> tuple[bytes, bytes | None]:
    """(public, secret) keys of a ZeroMQ certificate file (``zmq.auth.create_certificates``)."""
    import zmq.auth

    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot read the CURVE certificate {path} ({exc}); create key pairs with "
            "`python -c \"import zmq.auth; zmq.auth.create_certificates('DIR', 'NAME')\"`"
        ) from None
    if secret and not secret_key:
        raise ConfigError(
            f"{path} holds only a public key; give the `.key_secret` file created next to it"
        )
    return public, secret_key
