"""One teacher server: a frozen model behind a ZeroMQ ROUTER socket.

Requests (small) carry ``input_ids`` and ``attention_mask`` as raw frames; replies carry the
model's logits ``[B, T, V]`` or last hidden states ``[B, T, H]`` in the wire dtype (with
hidden states, the server's ``info`` describes the model's output layer — scale, soft cap,
where its weight and bias are stored — so the client reproduces its logits), written
straight into the trainer's shared-memory slot (``shm``), sent as zero-copy frames
(``frame``) or exported through CUDA IPC (``cuda``), whichever the request asks for.

The server is single-threaded and answers requests in arrival order; the client bounds how
many it sends ahead (backpressure). It stops on SIGTERM/SIGINT and, when started by a trainer,
when that trainer's process is gone.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import zmq

from deltakd.errors import ConfigError, DeltaKDError, ReferenceServerError
from deltakd.references import wire
from deltakd.references.shm import AttachedSegments, pid_alive

log = logging.getLogger(__name__)

OUTPUTS = ("logits", "hidden")
# Computes the reply for one batch: (input_ids [B, T], attention_mask [B, T]) -> [B, T, X].
ComputeFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def default_endpoint(role: str, run_id: str) -> str:
    import tempfile

    return f"ipc://{tempfile.gettempdir()}/deltakd-{run_id}-{role}.sock"


def local_model_dir(path: str, revision: str | None = None, *, role: str | None = None) -> Path:
    """The local directory holding ``path``'s files: a directory or ``mini:<name>`` as
    `deltakd.loading.resolve_model_path` reads it, else a Hub name resolved at ``revision``
    through huggingface_hub's cache (``HF_HOME``; with ``HF_HUB_OFFLINE=1`` nothing is fetched,
    and a model missing from the cache is refused). Only the config, weights and tokenizer
    files are fetched."""
    from deltakd.loading import resolve_model_path

    who = f"role {role}: " if role else ""
    fix = "give the directory a model was saved to with save_pretrained, mini:<name>, or a Hub name"
    try:
        resolved = resolve_model_path(str(path))
    except ConfigError:
        raise ConfigError(
            f"{who}no model at {path} (no config.json: no such path); {fix}"
        ) from None
    local = Path(resolved)
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ConfigError(f"{who}no model at {local} (no config.json); {fix}")
        return local
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                resolved,
                revision=revision,
                allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.py"],
            )
        )
    except Exception as exc:  # huggingface_hub's errors: not cached offline, unknown repo, ...
        raise ConfigError(
            f"{who}cannot find the model {path!r}"
            + (f" at revision {revision!r}" if revision else "")
            + f" ({type(exc).__name__}: {exc}). Give a directory saved with save_pretrained, or "
            "a Hub name that is in the Hugging Face cache (HF_HOME) when HF_HUB_OFFLINE=1"
        ) from None


def tokenizer_identity(model_dir: str | os.PathLike[str]) -> tuple[str | None, int | None]:
    """(fingerprint, size) of the tokenizer saved with a model (`deltakd.data.vocab`'s
    fingerprint: vocabulary, merges, added tokens), or (None, None) when it has none. Roles
    are compared by tokenizer, not by lm_head rows (checkpoints pad those differently)."""
    from deltakd.data.vocab import _TOKENIZER_FILES, load_tokenizer, tokenizer_fingerprint

    if not any((Path(model_dir) / name).is_file() for name in _TOKENIZER_FILES):
        return None, None
    try:
        tok = load_tokenizer(str(model_dir))
    except ConfigError as exc:  # e.g. only a tokenizer_config.json: nothing to compare
        log.warning("no usable tokenizer next to %s (%s); roles are not compared", model_dir, exc)
        return None, None
    return tokenizer_fingerprint(tok), len(tok)


class TeacherServer:
    """Serve one frozen role. Use `from_pretrained` for a real model, or pass `compute`."""

    def __init__(
        self,
        role: str,
        compute: ComputeFn,
        *,
        info: dict[str, Any],
        endpoint: str,
        dtype: str = "bf16",
        device: str = "cpu",
        secret: bytes | None = None,
        parent_pid: int | None = None,
        fault: str | None = None,
        curve_secret_key: str | None = None,
        curve_clients: str | None = None,
        batch_window_ms: float = 0.0,
    ) -> None:
        if bool(curve_secret_key) != bool(curve_clients):
            raise ConfigError(
                "CURVE needs both --curve-secret-key (the server's .key_secret file) and "
                "--curve-clients (a directory of the allowed clients' .key files)"
            )
        wire.require_safe_bind(endpoint, secret, bool(curve_secret_key))
        self.curve_secret_key = curve_secret_key
        self.curve_clients = curve_clients
        self.role = role
        self.compute = compute
        self.endpoint = endpoint
        self.wire_dtype = wire.wire_dtype(dtype)
        self.device = torch.device(device)
        self.secret = secret
        self.parent_pid = parent_pid
        self.info = {
            "role": role,
            "dtype": wire.dtype_name(self.wire_dtype),
            "device": str(self.device),
            "pid": os.getpid(),
            **info,
        }
        self.fault = _parse_fault(fault)
        self._served = 0
        self._stop = False
        self._segments = AttachedSegments()
        self._exported: Any = None
        self.rejected = 0  # messages refused for a bad or missing signature
        # How long to wait, after a forward request, for requests of other trainers (ranks
        # sharing this server) to join it in one forward pass.
        self.batch_window_s = max(0.0, float(batch_window_ms)) / 1000.0
        self.forwards = 0  # forward passes run (fewer than requests when batched)

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        role: str,
        model_path: str,
        *,
        output: str = "logits",
        device: str = "cpu",
        model_dtype: str | None = None,
        revision: str | None = None,
        **kwargs: Any,
    ) -> TeacherServer:
        """Load ``model_path`` (a directory, ``mini:<name>`` or a Hub name at ``revision``,
        through `deltakd.loading.load_model`: hub cache, ``HF_HUB_OFFLINE``) and serve it.

        ``output``: ``logits``, ``hidden``, or ``auto`` (hidden states when deltakd can
        reproduce the model's output layer, else logits, with a log line)."""
        from deltakd.loading import load_model

        if output not in (*OUTPUTS, "auto"):
            raise ConfigError(f"--output must be one of {(*OUTPUTS, 'auto')}, got {output!r}")
        directory = local_model_dir(model_path, revision, role=role)
        model = load_model(str(directory), dtype=model_dtype, device=device, role=role,
                           frozen=True)  # fmt: skip
        cfg = model.config
        head = model.get_output_embeddings()
        tok_fp, tok_size = tokenizer_identity(directory)
        info: dict[str, Any] = {
            "vocab_size": int(head.weight.shape[0]),
            "hidden_size": int(head.weight.shape[1]),
            "model_type": str(cfg.model_type),
            "model_path": str(directory.resolve()),
            "model_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "tokenizer_hash": tok_fp,
            "tokenizer_size": tok_size,
            "lm_head_keys": _lm_head_keys(model),
        }
        described = None
        if output in ("hidden", "auto"):
            from deltakd.heads import UnsupportedHeadError, logit_head

            # The client recomputes logits from hidden states: refuse a model whose output
            # layer deltakd cannot reproduce, and tell the client the one it has.
            try:
                described = logit_head(
                    model,
                    fix=f"Serve role {role} with `output: logits` (`deltakd serve --output "
                    "logits`).",
                )
            except UnsupportedHeadError as exc:
                if output == "hidden":
                    raise
                log.warning("role %s: %s; serving logits", role, exc)
        if described is not None:
            info["output"] = "hidden"
            info["logit_head"] = {
                "family": described.family,
                "scale": described.scale,
                "softcap": described.softcap,
                "bias_keys": _param_keys(model, head.bias) if head.bias is not None else [],
            }
            base = model.base_model

            def compute(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
                return base(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state

        else:
            info["output"] = "logits"

            def compute(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
                return model(input_ids=ids, attention_mask=mask, use_cache=False).logits

        log.info(
            "role %s: %s (%s, %s) answers %s", role, model_path, info["model_dtype"], device,
            info["output"],
        )  # fmt: skip
        return cls(role, compute, info=info, device=device, **kwargs)

    # ------------------------------------------------------------------------------------------
    def serve_forever(self, poll_ms: int = 200, ready: Callable[[], None] | None = None) -> None:
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        auth = None
        if self.curve_secret_key:
            from zmq.auth.thread import ThreadAuthenticator

            public, secret = wire.load_curve_cert(self.curve_secret_key, secret=True)
            # ZAP: the handshake of a client whose public key is not in the directory fails,
            # so unauthenticated peers never reach `handle`.
            auth = ThreadAuthenticator(ctx)
            auth.start()
            auth.configure_curve(domain="*", location=str(self.curve_clients))
            sock.curve_secretkey = secret
            sock.curve_publickey = public
            sock.curve_server = True
        try:
            sock.bind(self.endpoint)
        except zmq.ZMQError as exc:
            sock.close()
            if auth is not None:
                auth.stop()
            raise ConfigError(
                f"role {self.role}: cannot bind {self.endpoint} ({exc}); the address is in "
                "use or invalid. Pick another port / ipc path, or stop the process using it"
            ) from None
        log.info("role %s serving on %s (pid %d)", self.role, self.endpoint, os.getpid())
        if ready is not None:
            ready()
        try:
            while not self._stop:
                if sock.poll(poll_ms, zmq.POLLIN):
                    messages = [sock.recv_multipart(copy=False)]
                    if self.batch_window_s > 0:
                        messages += self._gather(sock, time.monotonic() + self.batch_window_s)
                    for ident, reply in self.handle_many(messages):
                        sock.send_multipart([ident, *reply], copy=False)
                elif self.parent_pid is not None and not pid_alive(self.parent_pid):
                    log.info("trainer process %d is gone; stopping", self.parent_pid)
                    break
        finally:
            sock.close(linger=0)
            if auth is not None:
                auth.stop()
            self._segments.close()
            if self.endpoint.startswith("ipc://"):
                Path(self.endpoint[len("ipc://") :]).unlink(missing_ok=True)

    def stop(self, *_: Any) -> None:
        self._stop = True

    def _gather(self, sock: Any, deadline: float) -> list[list[Any]]:
        """Messages that arrive before ``deadline`` (or are already queued)."""
        more = []
        while True:
            remaining = deadline - time.monotonic()
            if not sock.poll(max(0, int(remaining * 1000)), zmq.POLLIN):
                return more
            more.append(sock.recv_multipart(copy=False))

    def handle_many(self, messages: list[list[Any]]) -> list[tuple[Any, list[Any]]]:
        """Answer several messages (ROUTER identity first in each): forward requests with the
        same sequence length run as one forward pass (requests of ranks sharing this server),
        the rest one by one. Returns (identity, reply frames) pairs."""
        out: list[tuple[Any, list[Any]]] = []
        groups: dict[int, list[tuple[Any, dict[str, Any], torch.Tensor, torch.Tensor]]] = {}
        for frames in messages:
            ident, body = frames[0], frames[1:]
            parsed = self._parse_forward(body) if len(messages) > 1 else None
            if parsed is None:
                reply = self.handle(body)
                if reply is not None:
                    out.append((ident, reply))
                continue
            header, ids, mask = parsed
            groups.setdefault(int(ids.shape[1]), []).append((ident, header, ids, mask))
        for group in groups.values():
            if len(group) == 1:
                ident, header, ids, mask = group[0]
                reply = self._guarded(
                    header, lambda h=header, i=ids, m=mask: self._forward(h, i, m)
                )
                out.append((ident, reply))
                continue
            try:
                self._apply_fault_before()
                ids = torch.cat([g[2] for g in group])
                mask = torch.cat([g[3] for g in group])
                with torch.inference_mode():
                    outs = self.compute(ids.to(self.device), mask.to(self.device))
                self._served += 1
                self.forwards += 1
            except Exception as exc:
                log.exception("role %s: a batched forward failed", self.role)
                for ident, header, *_ in group:
                    out.append((ident, self._error(header["rid"], f"{type(exc).__name__}: {exc}")))
                continue
            start = 0
            for ident, header, ids_i, _ in group:
                part = outs[start : start + ids_i.shape[0]]
                start += ids_i.shape[0]
                with torch.inference_mode():
                    reply = self._guarded(header, lambda h=header, p=part: self._reply(h, p))
                out.append((ident, reply))
        return out

    def _guarded(self, header: dict[str, Any], fn: Callable[[], list[Any]]) -> list[Any]:
        try:
            return fn()
        except DeltaKDError as exc:
            return self._error(header.get("rid"), str(exc))
        except Exception as exc:  # a bug or OOM in the model: report it, keep serving
            log.exception("role %s: request %s failed", self.role, header.get("rid"))
            return self._error(header.get("rid"), f"{type(exc).__name__}: {exc}")

    def _parse_forward(
        self, frames: list[Any]
    ) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor] | None:
        """A well-formed, authenticated forward request as (header, ids, mask); None for
        anything else (`handle` answers it, errors included)."""
        try:
            header, payload = wire.decode(frames, self.secret)
            if header.get("op") != "forward":
                return None
            return (header, *self._inputs(header, payload))
        except Exception:
            return None

    # ------------------------------------------------------------------------------------------
    def handle(self, frames: list[Any]) -> list[Any] | None:
        """Answer one request (frames after the ROUTER identity); returns reply frames."""
        try:
            header, payload = wire.decode(frames, self.secret)
        except wire.AuthenticationError as exc:
            self.rejected += 1
            log.warning("role %s: rejected an unauthenticated message", self.role)
            return wire.encode({"op": "error", "rid": None, "message": str(exc)}, (), None)
        except DeltaKDError as exc:
            return self._error(None, str(exc))
        op = header.get("op")
        rid = header.get("rid")
        try:
            if op == "info":
                return wire.encode({"op": "info", "rid": rid, **self.info}, (), self.secret)
            if op == "ping":
                return wire.encode({"op": "pong", "rid": rid}, (), self.secret)
            if op == "release":
                if self._exported is not None:
                    self._exported.release(header.get("rids", []))
                return None
            if op == "forward":
                return self._forward(header, *self._inputs(header, payload))
            return self._error(rid, f"unknown request {op!r}")
        except DeltaKDError as exc:
            return self._error(rid, str(exc))
        except Exception as exc:  # a bug or OOM in the model: report it, keep serving
            log.exception("role %s: request %s failed", self.role, rid)
            return self._error(rid, f"{type(exc).__name__}: {exc}")

    def _error(self, rid: Any, message: str) -> list[Any]:
        return wire.encode(
            {"op": "error", "rid": rid, "role": self.role, "message": message}, (), self.secret
        )

    def _inputs(
        self, header: dict[str, Any], payload: list[Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The request's (input_ids, attention_mask), checked against its role and fingerprint."""
        if header.get("role") not in (None, self.role):
            raise ReferenceServerError(
                f"request for role {header.get('role')!r} reached the {self.role!r} server; "
                "check the endpoints in the references config"
            )
        specs = header.get("tensors", [])
        inputs: dict[str, torch.Tensor] = {}
        if len(payload) != len(specs):
            raise ReferenceServerError(
                f"request has {len(payload)} data frames for {len(specs)} tensors"
            )
        for spec, frame in zip(specs, payload):
            inputs[spec["name"]] = wire.from_buffer(
                frame.buffer, wire.dtype_from_name(spec["dtype"]), spec["shape"]
            )
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
        fp = wire.fingerprint({"input_ids": ids, "attention_mask": mask})
        if fp != header.get("fp"):
            raise ReferenceServerError(
                "the batch that arrived does not match its fingerprint (corrupted in transit)"
            )
        return ids, mask

    @torch.inference_mode()
    def _forward(
        self, header: dict[str, Any], ids: torch.Tensor, mask: torch.Tensor
    ) -> list[Any] | None:
        self._apply_fault_before()
        out = self.compute(ids.to(self.device), mask.to(self.device))  # (B, T, X)
        self._served += 1
        self.forwards += 1
        return self._reply(header, out)

    def _reply(self, header: dict[str, Any], out: torch.Tensor) -> list[Any]:
        """Reply frames carrying ``out`` ([B, T, X]) the way the request asks for."""
        rid = header["rid"]
        fp = header["fp"]
        if self.fault.get("malformed"):
            return [b"\xc1 not msgpack", b""]
        if self.fault.get("wrong_fp"):
            fp = "0" * 32
        reply = {"op": "result", "rid": rid, "fp": fp, "role": self.role}
        where = header.get("transport", "frame")
        if where == "shm":
            slot = header["slot"]
            dest = self._segments.tensor(
                slot["name"], slot["offset"], slot["capacity"], self.wire_dtype, out.shape
            )
            dest.copy_(out)  # cast to the wire dtype and write into the trainer's slot: 1 pass
            del dest
            spec = {
                "name": "out",
                "dtype": wire.dtype_name(self.wire_dtype),
                "shape": list(out.shape),
                "where": "shm",
            }
            return wire.encode({**reply, "tensors": [spec]}, (), self.secret)
        if where == "cuda":
            from deltakd.references import cuda_ipc

            if self._exported is None:
                self._exported = cuda_ipc.ExportedTensors()
            if out.device.type != "cuda":
                raise ReferenceServerError(
                    f"role {self.role} runs on {out.device}, so it cannot answer through CUDA "
                    "IPC; start it with --device cuda:N or use transport 'shm'"
                )
            sent = out.to(self.wire_dtype).contiguous()
            torch.cuda.current_stream(sent.device).synchronize()
            self._exported.release(header.get("release", []))
            self._exported.keep(rid, sent)
            spec = wire.tensor_spec("out", sent, where="cuda", ipc=cuda_ipc.export_tensor(sent))
            return wire.encode({**reply, "tensors": [spec]}, (), self.secret)
        sent = out.to("cpu", self.wire_dtype).contiguous()
        spec = wire.tensor_spec("out", sent, where="frame")
        return wire.encode({**reply, "tensors": [spec]}, [wire.tensor_buffer(sent)], self.secret)

    def _apply_fault_before(self) -> None:
        # Fault injection for reliability tests (`--fault`): never set in normal runs.
        f = self.fault
        if "die_after" in f and self._served >= f["die_after"]:
            os._exit(17)
        if "hang_after" in f and self._served >= f["hang_after"]:
            while True:
                time.sleep(3600)
        if "slow" in f:
            time.sleep(f["slow"])


def _parse_fault(spec: str | None) -> dict[str, Any]:
    """``die_after=N``, ``hang_after=N``, ``slow=SECONDS``, ``wrong_fp``, ``malformed``;
    comma-separated."""
    out: dict[str, Any] = {}
    for part in (spec or "").split(","):
        part = part.strip()
        if not part:
            continue
        key, _, value = part.partition("=")
        if key in ("die_after", "hang_after"):
            out[key] = int(value)
        elif key == "slow":
            out[key] = float(value)
        elif key in ("wrong_fp", "malformed"):
            out[key] = True
        else:
            raise ConfigError(
                f"unknown fault {part!r}; use die_after=N, hang_after=N, slow=S, wrong_fp or "
                "malformed"
            )
    return out


def _lm_head_keys(model: Any) -> list[str]:
    """Names under which the lm_head weight may be stored in the model's safetensors files."""
    return _param_keys(model, model.get_output_embeddings().weight) or ["lm_head.weight"]


def _param_keys(model: Any, param: torch.Tensor) -> list[str]:
    """Names of a parameter (all of them when tied), the output head's first."""
    keys = [name for name, p in model.named_parameters(remove_duplicate=False) if p is param]
    # The output head first, then tied input embeddings (checkpoints store only one of them).
    keys.sort(key=lambda k: 0 if "lm_head" in k else 1)
    return keys


def run_server(args: Any) -> int:
    """Entry point of `deltakd serve` (parsed args)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(int(args.threads))
    secret = wire.load_secret(args.secret_file)
    run_id = args.run_id or "serve"
    endpoint = args.endpoint or default_endpoint(args.role, run_id)
    # before loading a multi-GB model
    wire.require_safe_bind(endpoint, secret, bool(args.curve_secret_key))
    server = TeacherServer.from_pretrained(
        args.role,
        args.model,
        output=args.output,
        device=args.device,
        model_dtype=args.model_dtype,
        revision=args.revision,
        batch_window_ms=args.batch_window_ms or 0.0,
        endpoint=endpoint,
        dtype=args.dtype,
        secret=secret,
        parent_pid=args.parent_pid,
        fault=args.fault,
        curve_secret_key=args.curve_secret_key,
        curve_clients=args.curve_clients,
    )
    signal.signal(signal.SIGTERM, server.stop)
    signal.signal(signal.SIGINT, server.stop)
    server.serve_forever(ready=lambda: print(f"ready {endpoint}", flush=True))
    return 0
