"""`deltakd serve`: run one teacher server (docs/ARCHITECTURE.md §2)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="run one frozen model as a teacher server",
        description=(
            "Serve one frozen role (teacher_ft, teacher_raw, student_raw, ...) over ZeroMQ. "
            "Binds ipc:// or tcp://127.0.0.1 unless a shared secret is set "
            "(env DELTAKD_SERVER_SECRET or --secret-file)."
        ),
    )
    p.add_argument("--role", required=True, help="role name, e.g. teacher_ft")
    p.add_argument(
        "--model",
        required=True,
        help="directory saved with save_pretrained, mini:<name>, or a Hub name (resolved through "
        "the Hugging Face cache; HF_HUB_OFFLINE=1 uses only the cache)",
    )
    p.add_argument("--revision", default=None, help="Hub branch, tag or commit of --model")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument(
        "--endpoint",
        default=None,
        help="ZeroMQ address to bind (default ipc://TMPDIR/deltakd-RUNID-ROLE.sock)",
    )
    p.add_argument(
        "--output",
        choices=("logits", "hidden", "auto"),
        default="logits",
        help="reply with logits, or last hidden states (the client applies the model's own "
        "output layer; families not in docs/USAGE.md 'Model families checked' are refused), "
        "or auto (hidden states when the family is checked, else logits)",
    )
    p.add_argument(
        "--dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="wire dtype of replies"
    )
    p.add_argument(
        "--model-dtype",
        choices=("bf16", "fp16", "fp32"),
        default=None,
        help="dtype to load the weights in (default: transformers' default)",
    )
    p.add_argument(
        "--batch-window-ms",
        type=float,
        default=0.0,
        help="after a request, wait this long for requests of other ranks sharing this server "
        "and run those of equal length as one forward pass (default 0: no waiting)",
    )
    p.add_argument("--secret-file", default=None, help="file holding the shared HMAC secret")
    p.add_argument(
        "--curve-secret-key",
        default=None,
        help="CURVE: this server's .key_secret file (zmq.auth.create_certificates)",
    )
    p.add_argument(
        "--curve-clients", default=None, help="CURVE: directory of the allowed clients' .key files"
    )
    p.add_argument("--run-id", default=None, help=argparse.SUPPRESS)
    p.add_argument("--parent-pid", type=int, default=None, help="stop when this process exits")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--fault", default=None, help=argparse.SUPPRESS)  # fault injection (tests)
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from deltakd.references.server import run_server

    return run_server(args)
