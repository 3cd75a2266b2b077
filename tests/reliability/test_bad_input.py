"""Bad input across the package: the right error type, and a message with the cause AND the fix.

Each case here is one row of the table in docs/RELIABILITY.md. Kinds whose cause and fix are
already checked next to their module (tests/train, tests/data, tests/references) are referenced
from that table, not repeated here. The cases below need no model (or only the session's tiny
world), so the whole file stays in the default run.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import zmq

from deltakd.errors import (
    ConfigError,
    DataError,
    DeltaKDError,
    ReferenceServerError,
    VocabularyError,
)

MINIMAL = {"student_raw": "s", "teacher_ft": "f", "teacher_raw": "r", "output_dir": "o"}
OK_ROW = {"prompt": "p", "response": "r"}


def _expect(
    fn: Callable[[], Any], error: type[Exception], cause: str, fix: str
) -> DeltaKDError | Exception:
    """Run `fn`; it must raise `error` whose message matches both regexes (cause, then fix)."""
    with pytest.raises(error) as err:
        fn()
    msg = str(err.value)
    assert re.search(cause, msg, re.S), f"cause {cause!r} not in: {msg}"
    assert re.search(fix, msg, re.S), f"fix {fix!r} not in: {msg}"
    return err.value


def _jsonl(path: Path, lines: list[Any]) -> Path:
    path.write_text(
        "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines),
        encoding="utf-8",
    )
    return path


# --------------------------------------------------------------------------- config and CLI


def test_override_without_equals_sign(tmp_path):
    from deltakd.train.config import parse_overrides

    _expect(lambda: parse_overrides(["max_steps"]), ConfigError,
            r"override 'max_steps' is not KEY=VALUE", r"write e\.g\. `max_steps=100`")  # fmt: skip


def test_override_value_that_is_not_yaml():
    from deltakd.train.config import parse_overrides

    _expect(lambda: parse_overrides(["alpha=[1"]), ConfigError,
            r"override 'alpha=\[1': value is not valid YAML", r"quote it")  # fmt: skip


def test_override_that_nests_a_scalar_field():
    from deltakd.train.config import load_config

    _expect(lambda: load_config(None, {**MINIMAL, "alpha": {"x": 1}}), ConfigError,
            r"'alpha' = \{'x': 1\} is not allowed", r"expected a single value")  # fmt: skip


@pytest.mark.parametrize(
    ("content", "cause", "fix"),
    [
        (b"- a\n- b\n", r"must hold a mapping of `key: value` lines, found list", r"key: value"),
        (b"alpha: \xe9\n", r"is not valid UTF-8 YAML", r"Fix the file"),
        (b"alpha: [1\n", r"is not valid UTF-8 YAML", r"Fix the file"),
    ],
    ids=["not-a-mapping", "not-utf8", "broken-yaml"],
)
def test_config_file_that_cannot_be_read(tmp_path, content, cause, fix):
    from deltakd.train.config import load_config

    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    err = _expect(lambda: load_config(path), ConfigError, cause, fix)
    assert str(path) in str(err)


def test_resume_never_into_a_run_with_checkpoints(tmp_path):
    from deltakd.train.api import _resume_path
    from deltakd.train.config import load_config

    (tmp_path / "checkpoint-2").mkdir()
    cfg = load_config(None, {**MINIMAL, "output_dir": str(tmp_path), "resume": "never"})
    _expect(lambda: _resume_path(cfg), ConfigError,
            r"already holds checkpoints .*checkpoint-2.* resume=never",
            r"choose a new output_dir or set resume=auto")  # fmt: skip
    bad = load_config(None, {**MINIMAL, "output_dir": str(tmp_path), "resume": str(tmp_path)})
    _expect(lambda: _resume_path(bad), ConfigError, r"'resume' = .* is not allowed",
            r"auto, never, or a checkpoint directory holding trainer_state\.json")  # fmt: skip


@pytest.mark.parametrize("path", ["/nonexistent/deltakd/model", "runs/never-made/final"])
def test_missing_model_path_is_refused_before_any_download(path):
    from deltakd.data.vocab import resolve_model_path

    # `runs/x/final` has three parts, so it cannot be a Hub id `org/name`: refused at once
    # instead of after the Hub client's retries.
    _expect(lambda: resolve_model_path(path), ConfigError,
            rf"model path '{re.escape(path)}' does not exist", r"check the path")  # fmt: skip


def test_cli_prints_cause_and_fix_without_traceback(tmp_path, capsys):
    """What the user sees: one `deltakd <cmd>: error:` line, exit status 2, no traceback."""
    from deltakd.cli import main

    data = _jsonl(tmp_path / "d.jsonl", [OK_ROW])
    (tmp_path / "empty").mkdir()
    cases = [
        (["eval", "--model", str(tmp_path / "empty"), "--data", str(data)],
         r"deltakd eval: error: cannot load a model from .*empty'",
         r"pass a directory saved with save_pretrained \(e\.g\. a run's final/ directory\)"),
        (["eval", "--model", str(tmp_path / "no-model"), "--data", str(data)],
         r"deltakd eval: error: model path .*no-model' does not exist", r"check the path"),
        (["serve", "--role", "teacher_ft", "--model", str(tmp_path / "no-model")],
         r"deltakd serve: error: role teacher_ft: no model at .*no config\.json",
         r"give the directory a model was saved to with save_pretrained"),
        (["train", str(tmp_path / "none.yaml")],
         r"deltakd train: error: config file .*none\.yaml does not exist",
         r"pass the path of a YAML config"),
        (["train", str(tmp_path / "c.yaml"), "alpah=1"],
         r"unknown config key 'alpah'\. Did you mean 'alpha'\?", r"See docs/USAGE\.md"),
    ]  # fmt: skip
    (tmp_path / "c.yaml").write_text("student_raw: s\nteacher_ft: f\nteacher_raw: r\n")
    for argv, cause, fix in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert re.search(cause, err, re.S) and re.search(fix, err, re.S), err
        assert "Traceback" not in err


# --------------------------------------------------------------------------- data


@pytest.mark.parametrize(
    ("lines", "cause", "fix"),
    [
        ([OK_ROW, "{not json"], r"line 2 is not valid JSON", r"fix or remove that line"),
        (
            [OK_ROW, {"messages": [{"role": "user", "content": "q"}]}],
            r"row 2 has no assistant turn",
            r"add an assistant message or remove the row",
        ),
        (
            [OK_ROW, {"prompt": "p", "response": " "}],
            r"row 2 has an empty 'response'",
            r"remove the row or fill it in",
        ),
        (["", "  "], r"has no rows", r"point `dataset` at a non-empty file"),
    ],
    ids=["malformed-jsonl-line", "no-assistant-turn", "empty-response", "empty-file"],
)
def test_bad_rows_name_row_and_fix(tmp_path, lines, cause, fix):
    from deltakd.data import load_rows

    path = _jsonl(tmp_path / "d.jsonl", lines)
    err = _expect(lambda: load_rows(str(path)), DataError, cause, fix)
    assert str(path) in str(err)


def test_mixture_spec_with_an_empty_part():
    from deltakd.data import parse_spec

    _expect(lambda: parse_spec("mini:math+"), DataError, r"has an empty part around '\+'",
            r"write a mixture as e\.g\. `mini:instruct\+mini:math`")  # fmt: skip


def test_tokenizer_without_chat_template(tiny_world):
    from deltakd.data.tokenize import encode_chat
    from deltakd.data.vocab import load_tokenizer

    tok = load_tokenizer(str(tiny_world["tokenizer"]))
    tok.chat_template = None
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    _expect(lambda: encode_chat(tok, chat), DataError, r"the tokenizer has no chat template",
            r"use an instruct tokenizer or set `tokenizer\.chat_template`")  # fmt: skip


def test_too_few_embedding_rows(tiny_world, tmp_path):
    from deltakd.data.vocab import check_vocabulary, load_tokenizer
    from tests.conftest import make_model

    tok = load_tokenizer(str(tiny_world["tokenizer"]))
    short = make_model(tmp_path / "short", len(tok) - 3, hidden=8, layers=1, seed=0)
    _expect(lambda: check_vocabulary(tok, {"teacher_raw": str(short)}), VocabularyError,
            rf"role 'teacher_raw' .* has {len(tok) - 3} embedding rows but the tokenizer has "
            rf"{len(tok)} tokens", r"Use the tokenizer that belongs to this model family")  # fmt: skip


# --------------------------------------------------------------------------- teacher servers


def test_unauthenticated_message_names_the_secret_to_share():
    from deltakd.references import wire

    frames = wire.encode({"op": "ping", "rid": 1}, (), b"s" * 32)
    _expect(lambda: wire.decode(frames, b"t" * 32), wire.AuthenticationError,
            r"authentication failed: the message is not signed with this server's shared secret",
            rf"give both sides the same secret \(env {wire.SECRET_ENV} or --secret-file\)")  # fmt: skip
    assert issubclass(wire.AuthenticationError, ReferenceServerError)


def test_secret_file_missing_or_too_short(tmp_path):
    from deltakd.references import wire

    _expect(lambda: wire.load_secret(str(tmp_path / "none")), ConfigError,
            r"cannot read the server secret file", r"create it with")  # fmt: skip
    short = tmp_path / "short"
    short.write_text("abc")
    _expect(lambda: wire.load_secret(str(short)), ConfigError, r"has 3 bytes",
            r"use at least 16 random bytes")  # fmt: skip


def _free_port() -> int:
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    try:
        return sock.bind_to_random_port("tcp://127.0.0.1")
    finally:
        sock.close(linger=0)


def test_port_already_in_use(tmp_path):
    from deltakd.references.server import TeacherServer

    taken = zmq.Context.instance().socket(zmq.ROUTER)
    port = taken.bind_to_random_port("tcp://127.0.0.1")
    try:
        server = TeacherServer(
            "teacher_ft",
            lambda ids, mask: torch.zeros(*ids.shape, 4),
            info={"output": "logits", "vocab_size": 4, "hidden_size": 2},
            endpoint=f"tcp://127.0.0.1:{port}",
        )
        _expect(server.serve_forever, ConfigError,
                rf"role teacher_ft: cannot bind tcp://127\.0\.0\.1:{port} .*address is in use",
                r"Pick another port / ipc path, or stop the process using it")  # fmt: skip
    finally:
        taken.close(linger=0)


def _info_server(endpoint: str, info: dict, stop: threading.Event) -> None:
    """Answers `info` requests only (enough for the client's connection-time checks)."""
    from deltakd.references import wire

    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.bind(endpoint)
    try:
        while not stop.is_set():
            if sock.poll(20):
                ident, *frames = sock.recv_multipart()
                header, _ = wire.decode(frames)
                sock.send_multipart([ident, *wire.encode({"rid": header["rid"], **info})])
    finally:
        sock.close(linger=0)


def test_servers_with_different_vocabularies_are_refused(tmp_path):
    """Different tokenizers are refused; different lm_head row counts alone are not (padded
    heads, tests/references/test_server_scale.py)."""
    from deltakd.references.client import ServerReferences, ServerSpec

    stop = threading.Event()
    specs, threads = [], []
    for role, vocab in (("teacher_ft", 50), ("teacher_raw", 64)):
        ep = f"ipc://{tmp_path}/{role}.sock"
        info = {"op": "info", "role": role, "output": "logits", "vocab_size": vocab,
                "hidden_size": 8, "tokenizer_hash": f"tok{vocab}",
                "tokenizer_size": vocab}  # fmt: skip
        threads.append(threading.Thread(target=_info_server, args=(ep, info, stop), daemon=True))
        threads[-1].start()
        specs.append(ServerSpec(role, endpoint=ep))
    try:
        _expect(lambda: ServerReferences(specs, timeout=5.0, secret=b""), VocabularyError,
                r"tokenizers differ \(fingerprints \{'teacher_ft': 'tok50', 'teacher_raw': "
                r"'tok64'\}, sizes \{'teacher_ft': 50, 'teacher_raw': 64\}\)",
                r"every role must use the same tokenizer")  # fmt: skip
    finally:
        stop.set()
        for t in threads:
            t.join(5)


def test_max_restarts_exhausted_names_the_limit(tmp_path):
    """A launched server that keeps dying is restarted `max_restarts` times, then reported."""
    from deltakd.references import client as client_mod
    from deltakd.references.client import ServerReferences, ServerSpec

    conn = client_mod._Conn(spec=ServerSpec("teacher_ft", model="m"), endpoint="ipc://x")
    conn.restarts = 2
    refs = object.__new__(ServerReferences)  # no servers: only the restart policy is exercised
    refs.restart, refs.max_restarts = True, 2
    _expect(lambda: refs._restart(conn, "its process exited (code -9)"), ReferenceServerError,
            r"role 'teacher_ft' at ipc://x: its process exited .*already restarted 2 time\(s\) "
            r"\(max_restarts\)", r"Fix: check the server log")  # fmt: skip
    refs.restart = False
    _expect(lambda: refs._restart(conn, "did not answer within 3 s"), ReferenceServerError,
            r"did not answer within 3 s", r"raise `timeout` if it is only slow, or set "
            r"`restart: true`")  # fmt: skip
