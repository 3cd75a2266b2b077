"""`deltakd bench loss --peers`: deltakd and naive rows in their own processes, the same loss;
a peer that is not installed is named with how to install it."""

from __future__ import annotations

import importlib.util
import json

import pytest

from deltakd.bench import peers
from deltakd.cli import main

TINY = ["--n", "48", "--vocab", "300", "--hidden", "16", "--chunk", "20", "--threads", "1",
        "--repeats", "1"]  # fmt: skip


def _no_peers(monkeypatch):
    real = importlib.util.find_spec

    def find_spec(name, *a, **kw):
        return None if name in ("trl", "liger_kernel") else real(name, *a, **kw)

    monkeypatch.setattr(peers.importlib.util, "find_spec", find_spec)


def test_missing_peer_is_named_with_its_install_command(monkeypatch):
    _no_peers(monkeypatch)
    missing = peers.missing_peers(["naive", "trl", "liger", "fused"])
    assert set(missing) == {"trl", "liger"}
    assert "'trl'" in missing["trl"] and "pip install" in missing["trl"]
    assert "deltakd[bench]" in missing["liger"] and "liger-kernel" in missing["liger"]


def test_peers_table_deltakd_and_naive_rows(monkeypatch, capsys):
    _no_peers(monkeypatch)
    rc = main(["bench", "loss", "--peers", "--json", *TINY,
               "--methods", "matmul,naive,trl,kd_chunked,fused,delta_matmul,delta_naive,delta_fused"])  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert any(line.startswith("skipped trl:") and "pip install" in line for line in out)
    summary = json.loads(out[-1])
    assert "trl" in summary["skipped"] and "trl" not in summary
    assert summary["failed"] == {}
    jsd = [summary[m]["loss"] for m in ("naive", "kd_chunked", "fused")]
    assert jsd[0] > 0 and jsd[1:] == pytest.approx([jsd[0]] * 2, rel=1e-5)
    delta = [summary[m]["loss"] for m in ("delta_naive", "delta_fused")]
    assert delta[1] == pytest.approx(delta[0], rel=1e-5)
    assert summary["matmul"]["loss"] is None and summary["matmul"]["seconds"] > 0
    for m in ("naive", "fused", "delta_fused"):
        assert summary[m]["peak_rss_bytes"] >= summary[m]["baseline_rss_bytes"] > 10 << 20
    assert any("of matmul rate" in line for line in out)
    assert any("losses equal" in line for line in out)


def test_unknown_peer_method_is_refused(capsys):
    assert main(["bench", "loss", "--peers", *TINY, "--methods", "naive,unsloth"]) == 2
    assert "unsloth" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("trl") is None or importlib.util.find_spec("liger_kernel") is None,
    reason="needs the bench extra (pip install 'deltakd[bench]')",
)
def test_peers_give_deltakds_loss(capsys):
    rc = main(["bench", "loss", "--peers", "--json", *TINY,
               "--methods", "naive,trl,liger,liger_eager,fused"])  # fmt: skip
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ref = summary["naive"]["loss"]
    for m in ("trl", "liger", "liger_eager", "fused"):
        assert summary[m]["loss"] == pytest.approx(ref, rel=1e-5), m
