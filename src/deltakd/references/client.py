"""`ServerReferences`: the trainer's side of the teacher servers.

One ZeroMQ DEALER connection per role. `prefetch(k+1)` sends batch k+1 to every role at once
and returns; `fetch(k)` waits for the replies of batch k, refuses any reply whose request id
or batch fingerprint does not match what was sent (no stale logits, ever), and returns a
`ReferenceBatch`. At most `max_inflight` requests per role are outstanding (backpressure).

Servers are either launched here (one `deltakd serve` subprocess per role, stopped on
`close`) or already running (give their endpoints). A server that dies or stops answering is
detected within `timeout` seconds; with ``restart=True`` a server launched here is restarted
and the outstanding batches are sent again, so nothing is lost.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import zmq

from deltakd.errors import ConfigError, DeltaKDError, ReferenceServerError, VocabularyError
from deltakd.losses.heads import LogitHead
from deltakd.references import wire
from deltakd.references.base import ReferenceBatch, ReferenceSource
from deltakd.references.server import OUTPUTS, default_endpoint
from deltakd.references.shm import ShmRing, Slot, new_run_id

log = logging.getLogger(__name__)

TRANSPORTS = ("auto", "shm", "frame", "cuda")
PLACEMENTS = ("per_rank", "shared")


@dataclass
class ServerSpec:
    """One role's server. Launched here when ``endpoint`` is None (then ``model`` is needed);
    otherwise an already running server at ``endpoint``. ``model`` is also where hidden-state
    mode loads the role's lm_head from (default: the path the server reports)."""

    role: str
    model: str | None = None
    endpoint: str | None = None
    device: str = "cpu"
    output: str = "logits"
    dtype: str = "bf16"
    launch: bool | None = None
    fault: str | None = None  # fault injection for reliability tests only
    curve_server_key: str | None = None  # the server's public .key file (CURVE)
    revision: str | None = None  # Hub branch, tag or commit of `model`
    model_dtype: str | None = None  # dtype a launched server loads the weights in
    batch_window_ms: float | None = None  # a launched server's batching window (shared sets)

    def __post_init__(self) -> None:
        if self.output not in (*OUTPUTS, "auto"):
            raise ConfigError(
                f"references: role {self.role} output {self.output!r} is not one of "
                f"{(*OUTPUTS, 'auto')}"
            )
        if self.model_dtype is not None:
            wire.wire_dtype(self.model_dtype)
        wire.wire_dtype(self.dtype)
        if self.launch is None:
            self.launch = self.endpoint is None
        if self.launch and self.curve_server_key:
            raise ConfigError(
                f"references: role {self.role}: curve_server_key is for servers started "
                "elsewhere (give their endpoint); servers launched here bind ipc:// locally"
            )
        if self.launch and not self.model:
            raise ConfigError(
                f"references: role {self.role} has neither a model path to launch a server "
                "from nor an endpoint of a running server; give one of them"
            )


@dataclass
class _Pending:
    rid: int
    key: int
    fp: str
    shape: tuple[int, int]  # (B, T)
    batch: dict[str, torch.Tensor]
    slot: Slot | None = None
    reply: tuple[dict[str, Any], list[Any]] | None = None


@dataclass
class _Conn:
    spec: ServerSpec
    endpoint: str
    sock: Any = None
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)
    ring: ShmRing | None = None
    pending: OrderedDict[int, _Pending] = field(default_factory=OrderedDict)
    discarded: int = 0
    restarts: int = 0
    transport: str = "frame"
    output: str = "logits"  # what the server answers (`auto` resolved at the handshake)
    # A server launched by another rank on this node (placement: shared): waited for, and
    # reconnected to when it is restarted.
    shared: bool = False
    cuda_release: list[int] = field(default_factory=list)
    # Requests given up on whose slot the server may still write: freed when the reply lands.
    abandoned: dict[int, Slot | None] = field(default_factory=dict)


class ServerReferences(ReferenceSource):
    """Reference outputs from teacher servers (docs/ARCHITECTURE.md §2).

    Args:
        servers: one `ServerSpec` per role (or a mapping role -> dict of ServerSpec fields).
        timeout: seconds to wait for one reply before the server counts as hung or dead.
        start_timeout: seconds a launched server may take to load its model.
        restart: restart a launched server that died or hung and send its batches again.
        max_restarts: restarts allowed per role over the client's life.
        max_inflight: requests per role sent ahead and not yet fetched (backpressure).
        transport: ``shm`` (same host), ``frame`` (ZeroMQ frames, any host), ``cuda`` (CUDA
            IPC, same host GPUs), or ``auto`` (shm for local endpoints, else frame).
        zero_copy: return views into the shared-memory slots (no copy; a slot is reused once
            every tensor viewing it is freed) instead of private copies.
        secret: shared HMAC secret (default: env DELTAKD_SERVER_SECRET).
        threads: torch CPU threads for launched servers.
        run_id: names shared memory and sockets of this run (default random).
        curve_client_key: this client's CURVE ``.key_secret`` file, for servers whose spec has
            ``curve_server_key`` (encrypted and authenticated connections across hosts).
        placement: for servers launched here. ``per_rank``: every trainer process launches its
            own set (devices may name ``{local_rank}``, e.g. ``cuda:{local_rank+1}``).
            ``shared``: one set per node, launched by local rank 0 at endpoints every rank of
            the node derives from ``run_id`` (default: torchrun's rendezvous), used by all of
            them; the other ranks wait for it, notice when it dies and, with ``restart``,
            reconnect once local rank 0 has restarted it.
        local_rank: this process's rank on its node (default: env ``LOCAL_RANK``, else 0).
    """

    def __init__(
        self,
        servers: Sequence[ServerSpec] | Mapping[str, Mapping[str, Any]],
        *,
        timeout: float = 60.0,
        start_timeout: float = 300.0,
        restart: bool = False,
        max_restarts: int = 3,
        max_inflight: int = 2,
        transport: str = "auto",
        zero_copy: bool = True,
        secret: bytes | str | None = None,
        threads: int | None = None,
        run_id: str | None = None,
        cuda_device: str | None = None,
        curve_client_key: str | None = None,
        placement: str = "per_rank",
        local_rank: int | None = None,
    ) -> None:
        if isinstance(servers, Mapping):
            servers = [ServerSpec(role=r, **dict(s)) for r, s in servers.items()]
        specs = list(servers)
        if not specs:
            raise ConfigError("references: servers: give at least one role")
        if transport not in TRANSPORTS:
            raise ConfigError(f"references: transport {transport!r} is not one of {TRANSPORTS}")
        if max_inflight < 1:
            raise ConfigError(f"references: max_inflight must be >= 1, got {max_inflight}")
        if timeout <= 0:
            raise ConfigError(f"references: timeout must be > 0 seconds, got {timeout}")
        self.timeout = float(timeout)
        self.start_timeout = float(start_timeout)
        self.restart = bool(restart)
        self.max_restarts = int(max_restarts)
        self.max_inflight = int(max_inflight)
        self.zero_copy = bool(zero_copy)
        self.threads = threads
        self.cuda_device = cuda_device
        self.curve_client_key = curve_client_key
        if any(s.curve_server_key for s in specs) and not curve_client_key:
            raise ConfigError(
                "references: a server has curve_server_key but no curve_client_key is set; give "
                "this client's .key_secret file (its public key must be in the server's "
                "--curve-clients directory)"
            )
        if placement not in PLACEMENTS:
            raise ConfigError(
                f"servers.placement {placement!r} is not one of {PLACEMENTS}: `per_rank` (each "
                "rank launches its own servers) or `shared` (one set per node)"
            )
        self.placement = placement
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0)) if local_rank is None else local_rank
        shared_id = _shared_run_id(run_id) if placement == "shared" else None
        # In shared mode every rank of the node needs the same name for the shared endpoints;
        # shared memory stays per client (each rank owns its ring), so its names differ.
        self.run_id = run_id or new_run_id()
        if isinstance(secret, str):
            secret = secret.encode()
        self.secret = secret if secret is not None else wire.load_secret()
        self.roles = tuple(s.role for s in specs)
        self._ctx = zmq.Context.instance()
        self._rid = itertools.count(1)
        sweep_dead_log_dirs()
        # The owner's pid is in the name, so a later run can remove what a SIGKILL left behind.
        self._tmp = Path(tempfile.mkdtemp(prefix=f"deltakd-{self.run_id}-p{os.getpid()}-"))
        self._closed = False
        self._lm_heads: dict[str, LogitHead] | None = None
        self._conns: dict[str, _Conn] = {}
        try:
            for spec in specs:
                if shared_id is not None and spec.launch:
                    endpoint = default_endpoint(spec.role, shared_id)
                    if self.local_rank != 0:
                        spec = dataclasses.replace(spec, launch=False, endpoint=endpoint)
                else:
                    endpoint = spec.endpoint or _launch_endpoint(self._tmp, spec.role)
                if spec.launch:
                    wire.require_safe_bind(endpoint, self.secret)
                conn = _Conn(spec=spec, endpoint=endpoint)
                conn.shared = shared_id is not None and not spec.launch and spec.model is not None
                self._conns[spec.role] = conn
                if spec.launch:
                    self._launch(conn)
                self._connect(conn)
            for conn in self._conns.values():
                self._handshake(conn)
                conn.transport = self._pick_transport(conn, transport)
                if conn.transport == "shm":
                    # in flight + replies the caller still holds (zero-copy views)
                    conn.ring = ShmRing(self.run_id, max_slots=self.max_inflight + 4)
            self._check_vocab()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------------------------------
    # public API

    def info(self, role: str) -> dict[str, Any]:
        """What the role's server reported at connection (vocab_size, hidden_size, ...)."""
        return dict(self._conns[role].info)

    def prefetch(self, key: int, batch: Mapping[str, torch.Tensor]) -> None:
        """Send ``batch`` to every role now (no waiting); ignored for roles that already have
        ``max_inflight`` requests outstanding or already have this key."""
        batch = _cpu_batch(batch)
        fp = wire.fingerprint(batch)
        for conn in self._conns.values():
            if any(p.key == key and p.fp == fp for p in conn.pending.values()):
                continue
            if len(conn.pending) >= self.max_inflight:
                continue
            self._send(conn, key, batch, fp)

    def fetch(self, key: int, batch: Mapping[str, torch.Tensor]) -> ReferenceBatch:
        """Outputs of every role for ``batch``; waits for replies not yet here."""
        t0 = time.perf_counter()
        batch = _cpu_batch(batch)
        fp = wire.fingerprint(batch)
        out = ReferenceBatch()
        for role, conn in self._conns.items():
            pend = next((p for p in conn.pending.values() if p.key == key and p.fp == fp), None)
            if pend is None:
                # Not prefetched, or prefetched with another batch under this key: drop those.
                for p in [p for p in conn.pending.values() if p.key == key]:
                    self._abandon(conn, p)
                pend = self._send(conn, key, batch, fp)
            for p in [p for p in conn.pending.values() if p.key == key and p is not pend]:
                self._abandon(conn, p)  # an older batch prefetched under the same key
            tensor = self._result(conn, pend)
            if conn.output == "hidden":
                out.hidden[role] = tensor
            else:
                out.logits[role] = tensor
        out.wait_seconds = time.perf_counter() - t0
        return out

    def lm_heads(self) -> dict[str, LogitHead]:
        """Output layers of the roles served as hidden states (loaded once): weight and bias
        from the role's safetensors files, scale and soft cap as its server described them."""
        if self._lm_heads is None:
            heads = {}
            for role, conn in self._conns.items():
                if conn.output == "hidden":
                    heads[role] = _load_lm_head(conn)
            self._lm_heads = heads
        return dict(self._lm_heads)

    def close(self) -> None:
        if getattr(self, "_closed", True):
            return
        self._closed = True
        for conn in self._conns.values():
            if conn.cuda_release and conn.sock is not None:
                with contextlib.suppress(Exception):
                    self._send_release(conn)
            if conn.sock is not None:
                conn.sock.close(linger=0)
                conn.sock = None
            _stop_process(conn.proc)
            conn.proc = None
            if conn.ring is not None:
                conn.ring.close()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    # ------------------------------------------------------------------------------------------
    # connection management

    def _launch(self, conn: _Conn) -> None:
        spec = conn.spec
        conn.log_path = self._tmp / f"{spec.role}.log"
        cmd = [
            sys.executable,
            "-m",
            "deltakd.cli",
            "serve",
            "--role",
            spec.role,
            "--model",
            str(spec.model),
            "--device",
            device_for_rank(spec.device, self.local_rank),
            "--endpoint",
            conn.endpoint,
            "--output",
            spec.output,
            "--dtype",
            spec.dtype,
            "--run-id",
            self.run_id,
            "--parent-pid",
            str(os.getpid()),
        ]
        if self.threads:
            cmd += ["--threads", str(self.threads)]
        if spec.fault:
            cmd += ["--fault", spec.fault]
        if spec.revision:
            cmd += ["--revision", spec.revision]
        if spec.model_dtype:
            cmd += ["--model-dtype", spec.model_dtype]
        if spec.batch_window_ms:
            cmd += ["--batch-window-ms", str(spec.batch_window_ms)]
        env = dict(os.environ)
        if self.secret:
            env[wire.SECRET_ENV] = self.secret.decode("utf-8", "replace")
        with open(conn.log_path, "ab") as logf:
            conn.proc = subprocess.Popen(
                cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )
        log.info("launched %s server (pid %d) on %s", spec.role, conn.proc.pid, conn.endpoint)

    def _connect(self, conn: _Conn) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if conn.spec.curve_server_key:
            assert self.curve_client_key is not None
            server_public, _ = wire.load_curve_cert(conn.spec.curve_server_key, secret=False)
            public, secret = wire.load_curve_cert(self.curve_client_key, secret=True)
            sock.curve_secretkey = secret
            sock.curve_publickey = public
            sock.curve_serverkey = server_public
        sock.connect(conn.endpoint)
        conn.sock = sock

    def _handshake(self, conn: _Conn) -> None:
        rid = next(self._rid)
        limit = self.start_timeout if (conn.spec.launch or conn.shared) else self.timeout
        try:
            # Until a peer has completed the connection (a CURVE handshake the server refused,
            # a server still starting) the socket cannot take the request: that is no reply too.
            if not conn.sock.poll(int(limit * 1000), zmq.POLLOUT):
                raise _NoReply(f"could not send the handshake within {limit:g} s")
            self._send_frames(conn, wire.encode({"op": "info", "rid": rid}, (), self.secret))
            header, _ = self._recv(conn, limit, want=lambda h: h.get("rid") == rid, starting=True)
        except _NoReply as exc:
            curve = (
                "; with CURVE, check that this client's public key is in the server's "
                "--curve-clients directory and curve_server_key is the server's public key"
                if conn.spec.curve_server_key
                else ""
            )
            raise ReferenceServerError(
                self._describe(conn, str(exc))
                + f". Fix: check the server log{self._log_hint(conn)} and the endpoint, or raise "
                f"`start_timeout` for large models{curve}"
            ) from None
        if header.get("role") != conn.spec.role:
            raise ReferenceServerError(
                f"the server at {conn.endpoint} serves role {header.get('role')!r}, not "
                f"{conn.spec.role!r}; fix the endpoint of role {conn.spec.role} in the config"
            )
        if conn.spec.output != "auto" and header.get("output") != conn.spec.output:
            raise ConfigError(
                f"references: role {conn.spec.role} is configured with output "
                f"{conn.spec.output!r} but its server at {conn.endpoint} answers "
                f"{header.get('output')!r}; make them agree"
            )
        conn.info = header
        conn.output = str(header.get("output"))
        if conn.output not in OUTPUTS:
            raise ReferenceServerError(
                self._describe(conn, f"the server answers {conn.output!r}, not one of {OUTPUTS}")
                + ". Run the same deltakd version on trainer and server"
            )

    def _pick_transport(self, conn: _Conn, transport: str) -> str:
        if transport == "auto":
            return "shm" if wire.is_local_endpoint(conn.endpoint) else "frame"
        if transport == "shm" and not wire.is_local_endpoint(conn.endpoint):
            raise ConfigError(
                f"references: transport 'shm' needs the server on this host, but role "
                f"{conn.spec.role} is at {conn.endpoint}; use transport 'frame' (or 'auto')"
            )
        return transport

    def _check_vocab(self) -> None:
        """Roles must share one tokenizer; their lm_heads may have more rows than it has tokens
        (Qwen2.5-7B: 152064, 1.5B: 151936, tokenizer: 151665) — the trainer slices every role
        to the tokenizer's vocabulary, as with local references."""
        toks = {r: c.info.get("tokenizer_hash") for r, c in self._conns.items()}
        known = {h for h in toks.values() if h}
        if len(known) > 1:
            sizes = {r: c.info.get("tokenizer_size") for r, c in self._conns.items()}
            raise VocabularyError(
                f"the teacher servers' tokenizers differ (fingerprints {toks}, sizes {sizes}); "
                "Delta-KD combines logits token by token, so every role must use the same "
                "tokenizer. Use models of one family (e.g. Qwen2.5-7B and Qwen2.5-1.5B)"
            )
        for role, conn in self._conns.items():
            rows, size = conn.info.get("vocab_size"), conn.info.get("tokenizer_size")
            if isinstance(rows, int) and isinstance(size, int) and rows < size:
                raise VocabularyError(
                    f"role {role}: its model has {rows} lm_head rows but its tokenizer has "
                    f"{size} tokens: it cannot score every token. Use the tokenizer that belongs "
                    "to this model family"
                )

    def _restart(self, conn: _Conn, reason: str) -> None:
        if not (self.restart and (conn.spec.launch or conn.shared)):
            hint = (
                "set `restart: true` so deltakd restarts it"
                if conn.spec.launch
                else "restart it (it was started outside this trainer)"
            )
            raise ReferenceServerError(
                self._describe(conn, reason)
                + f". Fix: check the server log{self._log_hint(conn)}, raise `timeout` if it is "
                f"only slow, or {hint}"
            )
        if conn.restarts >= self.max_restarts:
            raise ReferenceServerError(
                self._describe(conn, reason)
                + f"; already restarted {conn.restarts} time(s) (max_restarts). Fix: check the "
                f"server log{self._log_hint(conn)}"
            )
        conn.restarts += 1
        log.warning(
            "role %s: %s; restarting it (%d/%d)",
            conn.spec.role,
            reason,
            conn.restarts,
            self.max_restarts,
        )
        _stop_process(conn.proc, grace=0.0)
        if conn.sock is not None:
            conn.sock.close(linger=0)
        if conn.spec.launch:
            self._launch(conn)
        # else: the rank that launched the shared server restarts it; wait for it below.
        conn.info = {}  # the old server's pid is gone; the handshake reports the new one
        self._connect(conn)
        self._handshake(conn)
        # Everything outstanding is sent again under new request ids; old replies are stale.
        old = list(conn.pending.values())
        conn.pending.clear()
        for p in old:
            if p.reply is not None:
                conn.pending[p.rid] = p  # already received and checked: keep it
                continue
            if p.slot is not None and conn.ring is not None:
                conn.ring.release(p.slot)
            self._send(conn, p.key, p.batch, p.fp)

    # ------------------------------------------------------------------------------------------
    # requests and replies

    def _send(self, conn: _Conn, key: int, batch: dict[str, torch.Tensor], fp: str) -> _Pending:
        ids = batch["input_ids"]
        if ids.dim() != 2:
            raise ConfigError(f"input_ids must be [B, T], got shape {tuple(ids.shape)}")
        mask = batch.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
        mask = mask.to(torch.int64)
        ids = ids.to(torch.int64)
        rid = next(self._rid)
        pend = _Pending(
            rid=rid, key=key, fp=fp, shape=(int(ids.shape[0]), int(ids.shape[1])), batch=batch
        )
        header: dict[str, Any] = {
            "op": "forward",
            "rid": rid,
            "role": conn.spec.role,
            "run": self.run_id,
            "fp": fp,
            "transport": conn.transport,
            "tensors": [
                wire.tensor_spec("input_ids", ids),
                wire.tensor_spec("attention_mask", mask),
            ],
        }
        if conn.transport == "shm":
            assert conn.ring is not None
            nbytes = wire.nbytes_of(
                wire.wire_dtype(conn.spec.dtype), (*pend.shape, self._last_dim(conn))
            )
            pend.slot = conn.ring.lease(nbytes)
            header["slot"] = {
                "name": pend.slot.name,
                "offset": pend.slot.offset,
                "capacity": pend.slot.capacity,
            }
        elif conn.transport == "cuda" and conn.cuda_release:
            header["release"], conn.cuda_release = conn.cuda_release, []
        frames = wire.encode(
            header, [wire.tensor_buffer(ids), wire.tensor_buffer(mask)], self.secret
        )
        self._send_frames(conn, frames)
        conn.pending[rid] = pend
        return pend

    def _send_frames(self, conn: _Conn, frames: list[Any]) -> None:
        try:
            conn.sock.send_multipart(frames, copy=False, flags=zmq.NOBLOCK)
        except zmq.Again:
            # The send queue is full only when the server stopped reading; treat as hung.
            raise ReferenceServerError(
                self._describe(conn, "cannot send: the connection's queue is full")
                + ". Fix: check that the server is running and reading requests"
            ) from None

    def _send_release(self, conn: _Conn) -> None:
        frames = wire.encode({"op": "release", "rids": conn.cuda_release}, (), self.secret)
        conn.cuda_release = []
        self._send_frames(conn, frames)

    def _last_dim(self, conn: _Conn) -> int:
        key = "hidden_size" if conn.output == "hidden" else "vocab_size"
        return int(conn.info[key])

    def _abandon(self, conn: _Conn, pend: _Pending) -> None:
        conn.pending.pop(pend.rid, None)
        if pend.reply is None:
            # The server may still write into the slot: keep it leased until its reply lands.
            conn.abandoned[pend.rid] = pend.slot
        elif pend.slot is not None and conn.ring is not None:
            conn.ring.release(pend.slot)

    def _result(self, conn: _Conn, pend: _Pending) -> torch.Tensor:
        while pend.reply is None:
            try:
                rid = pend.rid
                self._recv(conn, self.timeout, want=lambda h, rid=rid: h.get("rid") == rid)
            except _NoReply as exc:
                self._restart(conn, str(exc))  # raises unless restarting
                key, fp = pend.key, pend.fp
                pend = next(p for p in conn.pending.values() if p.key == key and p.fp == fp)
        conn.pending.pop(pend.rid, None)
        header, frames = pend.reply
        spec = header["tensors"][0]
        dtype = wire.dtype_from_name(spec["dtype"])
        shape = tuple(spec["shape"])
        where = spec.get("where")
        if where == "shm":
            assert conn.ring is not None and pend.slot is not None
            if self.zero_copy:
                return conn.ring.view(pend.slot, dtype, shape)
            return conn.ring.copy_out(pend.slot, dtype, shape)
        if where == "frame":
            return wire.from_buffer(frames[0].buffer, dtype, shape)
        if where == "cuda":
            from deltakd.references import cuda_ipc

            tensor = cuda_ipc.receive(spec["ipc"], self.cuda_device)
            conn.cuda_release.append(pend.rid)
            return tensor
        raise ReferenceServerError(self._describe(conn, f"reply with unknown location {where!r}"))

    def _recv(
        self, conn: _Conn, limit: float, *, want: Any, starting: bool = False
    ) -> tuple[dict[str, Any], list[Any]]:
        """Receive until a reply satisfying ``want`` arrives; replies to other outstanding
        requests are checked and stored on their `_Pending`; unknown ones are discarded."""
        deadline = time.monotonic() + limit
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                what = "did not finish starting" if starting else "did not answer"
                refused = (
                    f"; {conn.discarded} reply(ies) matching no request were refused"
                    if conn.discarded
                    else ""
                )
                raise _NoReply(f"{what} within {limit:g} s{self._proc_state(conn)}{refused}")
            if conn.sock.poll(int(min(remaining, 0.25) * 1000) + 1, zmq.POLLIN):
                frames = conn.sock.recv_multipart(copy=False)
                header, payload = self._decode(conn, frames)
                if header.get("op") == "error":
                    raise ReferenceServerError(
                        self._describe(conn, f"server error: {header.get('message')}")
                    )
                if header.get("rid") in conn.abandoned:
                    slot = conn.abandoned.pop(header["rid"])
                    if slot is not None and conn.ring is not None:
                        conn.ring.release(slot)
                    continue
                if want(header):
                    if header.get("op") == "result":
                        self._accept(conn, header, payload)
                    return header, payload
                if header.get("op") == "result" and header.get("rid") in conn.pending:
                    self._accept(conn, header, payload)
                else:
                    conn.discarded += 1
                    log.warning(
                        "role %s: discarded a reply for unknown request %s (stale)",
                        conn.spec.role,
                        header.get("rid"),
                    )
            elif conn.proc is not None and conn.proc.poll() is not None:
                raise _NoReply(f"its process exited{self._proc_state(conn)}")
            elif conn.proc is None and not _server_alive(conn):
                raise _NoReply(
                    f"its process {conn.info.get('pid')} on this host is gone (a server shared "
                    "by the ranks of this node)"
                )

    def _decode(self, conn: _Conn, frames: list[Any]) -> tuple[dict[str, Any], list[Any]]:
        try:
            header, payload = wire.decode(frames, self.secret)
        except DeltaKDError as exc:
            raise ReferenceServerError(self._describe(conn, str(exc))) from None
        if header.get("op") == "error" and header.get("rid") is None:
            raise ReferenceServerError(self._describe(conn, str(header.get("message"))))
        return header, payload

    def _accept(self, conn: _Conn, header: dict[str, Any], payload: list[Any]) -> None:
        """Check a result against its request before anyone can see it."""
        pend = conn.pending[header["rid"]]
        if header.get("fp") != pend.fp or header.get("role") != conn.spec.role:
            raise ReferenceServerError(
                self._describe(
                    conn,
                    f"refused the reply to request {pend.rid} (batch {pend.key}): it carries "
                    f"batch fingerprint {header.get('fp')} / role {header.get('role')!r} but the "
                    f"request had {pend.fp} / {conn.spec.role!r}",
                )
                + ". The server answered for another batch; restart it and check that no two "
                "trainers share one server"
            )
        tensors = header.get("tensors") or []
        expect = (*pend.shape, self._last_dim(conn))
        want_dtype = wire.dtype_name(wire.wire_dtype(conn.spec.dtype))
        if (
            len(tensors) != 1
            or tuple(tensors[0].get("shape", ())) != expect
            or tensors[0].get("dtype") != want_dtype
            or (tensors[0].get("where") == "frame" and len(payload) != 1)
        ):
            raise ReferenceServerError(
                self._describe(
                    conn,
                    f"refused a malformed reply to request {pend.rid}: expected one {want_dtype} "
                    f"tensor of shape {list(expect)}, got {tensors}",
                )
                + ". Run the same deltakd version and model on trainer and server"
            )
        if tensors[0].get("where") == "frame":
            n = wire.nbytes_of(wire.dtype_from_name(tensors[0]["dtype"]), expect)
            if len(payload[0]) != n:
                raise ReferenceServerError(
                    self._describe(conn, f"reply frame has {len(payload[0])} bytes, expected {n}")
                )
        pend.reply = (header, payload)

    def _describe(self, conn: _Conn, what: str) -> str:
        return f"teacher server for role {conn.spec.role!r} at {conn.endpoint}: {what}"

    def _proc_state(self, conn: _Conn) -> str:
        if conn.proc is None:
            return " (server not launched by this trainer)"
        code = conn.proc.poll()
        if code is None:
            return f" (process {conn.proc.pid} is alive: hung or slower than the timeout)"
        tail = ""
        if conn.log_path is not None and conn.log_path.is_file():
            lines = conn.log_path.read_text(errors="replace").strip().splitlines()[-5:]
            if lines:
                tail = "; last log lines: " + " | ".join(lines)
        return f" (process {conn.proc.pid} exited with code {code}{tail})"

    def _log_hint(self, conn: _Conn) -> str:
        return f" ({conn.log_path})" if conn.log_path else ""


class _NoReply(Exception):
    pass


#: Keys of the `servers:` settings that apply to the client as a whole.
CLIENT_KEYS = (
    "timeout",
    "start_timeout",
    "restart",
    "max_restarts",
    "max_inflight",
    "transport",
    "zero_copy",
    "threads",
    "run_id",
    "cuda_device",
    "curve_client_key",
    "placement",
)
#: Keys that set every role's server (a role's own entry under `roles:` overrides them).
ROLE_KEYS = (
    "model",
    "endpoint",
    "device",
    "output",
    "dtype",
    "launch",
    "fault",
    "curve_server_key",
    "revision",
    "model_dtype",
    "batch_window_ms",
)


def from_settings(
    settings: Mapping[str, Any], models: Mapping[str, str | None]
) -> ServerReferences:
    """Build from the ``servers:`` settings of a run config.

    ``models`` maps each needed role to its model path (launched servers load it; hidden-state
    mode reads the lm_head from it). ``settings`` may hold client keys (`CLIENT_KEYS`),
    defaults for every role (`ROLE_KEYS`, e.g. ``device: cpu``, ``output: hidden``) and
    ``roles: {role: {endpoint: ..., device: ...}}`` overrides. Example::

        servers:
          restart: true
          timeout: 60
          roles:
            teacher_ft: {device: "cuda:1"}
            teacher_raw: {endpoint: "tcp://127.0.0.1:5555"}
    """
    settings = dict(settings or {})
    per_role = dict(settings.pop("roles", None) or {})
    allowed = set(CLIENT_KEYS) | set(ROLE_KEYS)
    unknown = set(settings) - allowed
    if unknown:
        raise ConfigError(
            f"servers: unknown key(s) {sorted(unknown)}; allowed: {sorted(allowed)} and roles"
        )
    extra = set(per_role) - set(models)
    if extra:
        raise ConfigError(
            f"servers: roles {sorted(extra)} are not needed by this method (it needs "
            f"{sorted(models)}); remove them"
        )
    defaults = {k: settings.pop(k) for k in ROLE_KEYS if k in settings}
    specs = []
    for role, model in models.items():
        entry = {**defaults, **dict(per_role.get(role) or {})}
        bad = set(entry) - set(ROLE_KEYS)
        if bad:
            raise ConfigError(
                f"servers: roles: {role}: unknown key(s) {sorted(bad)}; allowed {list(ROLE_KEYS)}"
            )
        entry.setdefault("model", model)
        specs.append(ServerSpec(role=role, **entry))
    return ServerReferences(specs, **settings)


def from_config(config: Any, roles: Sequence[str], device: Any) -> ServerReferences:
    """`references: servers` for `deltakd train`: one server per role (the trainer's factory).

    Role model paths come from the run config (``teacher_ft: PATH`` ...), settings from its
    ``servers:`` mapping (see `from_settings`). ``device`` is the student's; servers run on
    ``cpu`` unless ``servers: {device: ...}`` or a role's own entry says otherwise. Launched
    servers load their weights in the run's reference dtype (`deltakd.loading.reference_dtype`)
    unless ``model_dtype`` is set; with ``fused_loss`` they answer with hidden states
    (``output: auto``: logits for a family deltakd cannot reproduce) unless ``output`` is set.
    """
    from deltakd.loading import reference_dtype, resolve_model_path

    models = {}
    for role in roles:
        path = getattr(config, role, None)
        models[role] = resolve_model_path(path) if path else None
    settings = dict(getattr(config, "servers", None) or {})
    if torch.device(device).type == "cuda" and "cuda_device" not in settings:
        settings["cuda_device"] = str(device)
    if "model_dtype" not in settings:
        settings["model_dtype"] = _DTYPE_NAMES[reference_dtype(config)]
    if "output" not in settings and getattr(config, "fused_loss", False):
        settings["output"] = "auto"
    return from_settings(settings, models)


_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


_LOG_DIR_RE = re.compile(r"deltakd-[0-9A-Za-z]+-p(\d+)-[^/]+")


def sweep_dead_log_dirs(max_age_s: float = 3600.0, root: str | Path | None = None) -> list[Path]:
    """Remove server-log directories (``TMPDIR/deltakd-RUN-pPID-*``) whose owning trainer is
    dead and that nothing has touched for ``max_age_s`` (so a crashed run's logs stay readable
    for a while). Returns the directories removed."""
    from deltakd.references.shm import pid_alive

    base = Path(root or tempfile.gettempdir())
    removed = []
    now = time.time()
    for entry in base.glob("deltakd-*-p*-*"):
        m = _LOG_DIR_RE.fullmatch(entry.name)
        if not m or not entry.is_dir() or int(m.group(1)) == os.getpid():
            continue
        try:
            fresh = now - entry.stat().st_mtime < max_age_s
        except FileNotFoundError:
            continue
        if fresh or pid_alive(int(m.group(1))):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    if removed:
        log.info("removed %d server-log dir(s) left by dead trainers", len(removed))
    return removed


def _launch_endpoint(tmp: Path, role: str) -> str:
    path = tmp / f"{role}.sock"
    if len(str(path)) > 100:  # sun_path limit (108 bytes on Linux)
        return default_endpoint(role, tmp.name[-8:])
    return f"ipc://{path}"


def _cpu_batch(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if "input_ids" not in batch:
        raise ConfigError("a reference batch needs `input_ids` ([B, T])")
    ids = batch["input_ids"].detach().to("cpu", torch.int64)
    mask = batch.get("attention_mask")
    # What is sent (and fingerprinted on both sides): int64 ids and an explicit mask.
    mask = torch.ones_like(ids) if mask is None else mask.detach().to("cpu", torch.int64)
    return {"input_ids": ids, "attention_mask": mask}


def _stop_process(proc: subprocess.Popen[bytes] | None, grace: float = 5.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    if grace > 0:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
            return
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)


def _load_lm_head(conn: _Conn) -> LogitHead:
    """The role's output layer: [V, H] weight (and [V] bias) from its safetensors files under
    the names the server reported, with the scale and soft cap the server read from its model
    (`deltakd.heads`). Plain numbers and names travel in the signed msgpack header; tensors
    are read here with safetensors: nothing is unpickled."""
    described = conn.info.get("logit_head")
    if not isinstance(described, dict):
        raise ReferenceServerError(
            f"role {conn.spec.role}: the server at {conn.endpoint} sends hidden states but does "
            "not describe its model's output layer (an older deltakd?); run the same deltakd "
            "version on trainer and server, or use output: logits"
        )
    weight = _load_tensor(conn, list(conn.info.get("lm_head_keys") or ["lm_head.weight"]))
    bias_keys = list(described.get("bias_keys") or [])
    bias = _load_tensor(conn, bias_keys) if bias_keys else None
    try:
        softcap = described.get("softcap")
        return LogitHead(
            weight,
            bias,
            scale=float(described.get("scale", 1.0)),
            softcap=None if softcap is None else float(softcap),
            family=str(described.get("family")),
        )
    except (TypeError, ValueError) as exc:
        raise ReferenceServerError(
            f"role {conn.spec.role}: the server described an unusable output layer ({exc}); "
            "run the same deltakd version on trainer and server, or use output: logits"
        ) from None


def _load_tensor(conn: _Conn, keys: list[str]) -> torch.Tensor:
    """The first of `keys` found in the role's safetensors files."""
    from safetensors import safe_open

    from deltakd.references.server import local_model_dir

    if conn.spec.model:
        # A directory, mini:<name> or a Hub name (its files from huggingface_hub's cache).
        path = local_model_dir(conn.spec.model, conn.spec.revision, role=conn.spec.role)
    else:
        path = Path(conn.info.get("model_path", ""))
    index = path / "model.safetensors.index.json"
    files: list[Path]
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = [path / weight_map[k] for k in keys if k in weight_map]
    else:
        files = sorted(path.glob("*.safetensors"))
    for f in dict.fromkeys(files):
        with safe_open(str(f), framework="pt") as st:
            names = set(st.keys())
            for k in keys:
                if k in names:
                    return st.get_tensor(k)
    raise ConfigError(
        f"role {conn.spec.role}: hidden-state mode needs the lm_head, but none of "
        f"{keys} is in the safetensors files at {path}; give `model:` the checkpoint directory "
        "for this role or use output: logits"
    )


_RANK_TEMPLATE = re.compile(r"\{\s*local_rank\s*(?:([+-])\s*(\d+)\s*)?\}")


def device_for_rank(device: str, local_rank: int) -> str:
    """``device`` with ``{local_rank}`` / ``{local_rank+N}`` replaced for this rank
    (``cuda:{local_rank+1}`` -> ``cuda:3`` on local rank 2): per-rank servers on their own GPU."""

    def sub(m: re.Match[str]) -> str:
        n = int(m.group(2) or 0)
        return str(local_rank - n if m.group(1) == "-" else local_rank + n)

    out = _RANK_TEMPLATE.sub(sub, device)
    if "{" in out or "}" in out:
        raise ConfigError(
            f"servers.device {device!r}: the only template is {{local_rank}} or "
            "{local_rank+N}, e.g. cuda:{local_rank+1}"
        )
    return out


def _shared_run_id(run_id: str | None) -> str:
    """The name all ranks of a node give their shared servers: from ``run_id`` when set, else
    from torchrun's rendezvous (master address and port, run id), equal on every rank and
    different for two jobs on one host."""
    if run_id:
        return run_id
    parts = [os.environ.get(k, "") for k in ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")]
    if not any(parts):
        return new_run_id()  # a single process: nobody to share with
    return hashlib.blake2b("|".join(parts).encode(), digest_size=6).hexdigest()


def _server_alive(conn: _Conn) -> bool:
    """False when a server launched by another rank of this node is known to be gone."""
    from deltakd.references.shm import pid_alive

    pid = conn.info.get("pid")
    if not conn.shared or not isinstance(pid, int):
        return True
    return pid_alive(pid)
