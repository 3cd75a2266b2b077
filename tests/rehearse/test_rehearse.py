"""The rehearsal world resolves the shipped configs' Hub ids offline, at the real shapes, and
the quick rehearsal (1 process, 2 steps, delta_kd with references: local, Qwen2.5 and Llama 3
shapes) trains on it.

The world is built once per session into a temporary directory: the quick world
(`QUICK_ROWS`: every model at its real shape and every split with its schema, a few rows
each), or reused from `DELTAKD_REHEARSAL_DIR` when that names a built world. The full
rehearsal (`deltakd rehearse run DIR`, every method) is `slow`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[2] / "src")


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    given = os.environ.get("DELTAKD_REHEARSAL_DIR")
    if given and (Path(given) / "rehearsal.json").is_file():
        yield Path(given)
        return
    from deltakd.rehearse.world import QUICK_ROWS, build

    root = tmp_path_factory.mktemp("rehearsal")
    build(root, families=("qwen", "llama"), rows=QUICK_ROWS, log=lambda _: None)
    yield root
    shutil.rmtree(root, ignore_errors=True)  # 11 GB of weights: not kept between sessions


def _offline(world: Path, code: str, cwd: Path | None = None) -> dict:
    """Run `code` (which prints one JSON line last) with HF_HOME=world, offline."""
    env = {**os.environ, "HF_HOME": str(world), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=600, cwd=cwd)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_hub_ids_resolve_offline_to_the_real_configs(world: Path) -> None:
    got = _offline(
        world,
        """
import json
from transformers import AutoConfig, AutoTokenizer
out = {}
for repo in ("Qwen/Qwen2.5-7B", "Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-1.5B"):
    c = AutoConfig.from_pretrained(repo)
    out[repo] = [c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
                 c.intermediate_size, c.vocab_size, c.tie_word_embeddings,
                 c.max_position_embeddings, c.num_hidden_layers]
tok = AutoTokenizer.from_pretrained("Qwen/Qwen2.5-7B-Instruct")
out["tokens"] = len(tok)
out["ids"] = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>",
                                        "<|file_sep|>"])
out["eos"] = tok.eos_token
out["chat"] = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                      add_generation_prompt=True)
print(json.dumps(out))
""",
    )
    assert got["Qwen/Qwen2.5-7B"] == [3584, 28, 4, 18944, 152064, False, 131072, 1]
    assert got["Qwen/Qwen2.5-7B-Instruct"] == [3584, 28, 4, 18944, 152064, False, 32768, 1]
    assert got["Qwen/Qwen2.5-1.5B"] == [1536, 12, 2, 8960, 151936, True, 131072, 1]
    assert got["tokens"] == 151665 and got["ids"] == [151643, 151644, 151645, 151664]
    assert got["eos"] == "<|im_end|>"
    assert got["chat"] == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
        "assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_datasets_have_the_published_schemas_and_lengths(world: Path) -> None:
    got = _offline(
        world,
        """
import json, datasets
from deltakd.data import load_rows
out = {}
for repo, split in (("HuggingFaceH4/ultrachat_200k", "train_sft"),
                    ("nvidia/OpenMathReasoning", "cot")):
    ds = datasets.load_dataset(repo, split=split)
    out[repo] = {"columns": ds.column_names, "rows": len(ds)}
out["splits"] = {r: list(datasets.load_dataset_builder(r).info.splits)
                 for r in ("HuggingFaceH4/ultrachat_200k", "nvidia/OpenMathReasoning")}
om = load_rows("openmath:nvidia/OpenMathReasoning", "cot", limit=3)
out["tail"] = om[0]["messages"][-1]["content"][-40:]
out["answer"] = om[0]["answer"]
out["origin"] = om[0]["origin"]
print(json.dumps(out))
""",
    )
    assert got["HuggingFaceH4/ultrachat_200k"]["columns"] == ["prompt", "prompt_id", "messages"]
    assert got["nvidia/OpenMathReasoning"]["columns"] == [
        "expected_answer", "problem_type", "problem_source", "generation_model",
        "pass_rate_72b_tir", "problem", "generated_solution", "inference_mode",
        "used_in_kaggle"]  # fmt: skip
    assert got["splits"]["HuggingFaceH4/ultrachat_200k"] == [
        "train_sft", "test_sft", "train_gen", "test_gen"]  # fmt: skip
    assert got["splits"]["nvidia/OpenMathReasoning"] == [
        "cot", "tir", "genselect", "additional_problems"]  # fmt: skip
    assert got["tail"].endswith(f"$\\boxed{{{got['answer']}}}$.")
    assert got["origin"].startswith("openmath:nvidia/OpenMathReasoning split 'cot' row ")
    info = json.loads((world / "rehearsal.json").read_text())
    chats = info["datasets"]["HuggingFaceH4/ultrachat_200k"]["train_sft"]
    cot = info["datasets"]["nvidia/OpenMathReasoning"]["cot"]
    assert 1000 <= chats["median_tokens"] <= 2500  # multi-turn chats around 1.5k tokens
    assert cot["median_tokens"] >= 2500  # chain-of-thought of several thousand tokens


def test_shipped_openmath_config_keeps_the_chains_of_thought(world: Path) -> None:
    """At the shipped max_length no realistic chain of thought is dropped (at 4096, the old
    value, most were: their median is ~5.6k tokens)."""
    got = _offline(
        world,
        """
import json, yaml
from deltakd.data.specs import load_rows
from deltakd.data.tokenize import encode_rows
from transformers import AutoTokenizer
cfg = yaml.safe_load(open("configs/qwen2.5-7b-to-1.5b-openmath.yaml"))
tok = AutoTokenizer.from_pretrained(cfg["tokenizer"])
rows = load_rows(cfg["dataset"], cfg["train_split"])
out = {}
for n in (cfg["max_length"], 4096):
    _, kept, _ = encode_rows(tok, rows, max_length=n, truncation=cfg["truncation"])
    out[str(n)] = [len(rows), len(kept)]
out["micro_batch_tokens"] = cfg["max_length"] * cfg["per_device_batch_size"]
print(json.dumps(out))
""",
        cwd=Path(SRC).parent,
    )
    rows, kept = got.pop("8192")
    assert rows >= 8 and kept == rows, (rows, kept)
    assert got["4096"][1] < rows / 2  # what the old max_length dropped
    assert got["micro_batch_tokens"] == 8192  # the activation memory of 2 × 4096


def test_quick_rehearsal_trains_the_shipped_config(world: Path, tmp_path: Path) -> None:
    from deltakd.rehearse.run import rehearse

    results = rehearse(world, quick=True, families=("qwen", "llama"), out=tmp_path,
                       log=lambda _: None)  # fmt: skip
    assert [r.name for r in results] == [
        "delta_kd local (qwen, ultrachat)", "delta_kd local (llama, ultrachat)"]  # fmt: skip
    table = (tmp_path / "rehearsal.md").read_text()
    for res, fam in zip(results, ("qwen", "llama")):
        assert res.status == "ok", Path(res.log).read_text()[-3000:]
        assert res.s_per_step is not None and res.s_per_step > 0
        assert len(res.peak_rss_gb) == 1 and res.peak_rss_gb[0] > 5  # 7B shapes + student
        assert (tmp_path / f"quick-{fam}" / "final" / "model.safetensors").is_file()
        history = [json.loads(x) for x in (tmp_path / f"quick-{fam}" / "history.jsonl").open()]
        losses = [h["loss"] for h in history if "loss" in h]
        assert len(losses) == 2 and all(x == x and x > 0 for x in losses)  # finite, positive
        assert f"| delta_kd local ({fam}, ultrachat) | ok |" in table


@pytest.mark.slow
def test_full_rehearsal(tmp_path: Path) -> None:
    """`deltakd rehearse build` + `run`: every row green (about 20 min on 2 cores)."""
    from deltakd.rehearse.run import rehearse
    from deltakd.rehearse.world import build

    root = Path(os.environ.get("DELTAKD_REHEARSAL_DIR") or tmp_path / "world")
    if not (root / "rehearsal.json").is_file():
        build(root, log=lambda _: None)
    quick = rehearse(root, quick=True, families=("qwen", "llama"), out=tmp_path / "quick")
    full = rehearse(root, out=tmp_path / "full")
    bad = [(r.name, r.status, r.log) for r in quick + full if r.status != "ok"]
    assert not bad, bad


def test_run_without_a_built_world_says_how_to_build_it(tmp_path: Path, capsys) -> None:
    from deltakd.cli import main

    assert main(["rehearse", "run", str(tmp_path)]) == 2
    assert f"run `deltakd rehearse build {tmp_path}` first" in capsys.readouterr().err


def test_the_shipped_configs_are_changed_only_by_the_listed_overrides(tmp_path: Path) -> None:
    """Every row trains a shipped config; its overrides are the documented CPU ones, the
    steps and output, and what its method needs."""
    from deltakd.rehearse.run import CPU_OVERRIDES, plan

    allowed = set(CPU_OVERRIDES) | {"max_steps", "output_dir", "method", "max_new_tokens",
                                    "on_policy_ratio", "references", "cache.dir", "limit",
                                    "servers.placement", "servers.output",
                                    "servers.threads",
                                    # random weights never stop: seqkd keeps capped replies
                                    "method_args.keep_truncated"}  # fmt: skip
    rows = plan(tmp_path, tmp_path / "runs", quick=False, nproc=2, steps=2)
    trains = [r for r in rows if r.train is not None]
    assert {r.name.split(" (")[0] for r in trains} == {
        "delta_kd local", "delta_kd cache: train", "kd", "seqkd", "on_policy", "minillm",
        "delta_kd servers"}  # fmt: skip
    for r in trains:
        config, overrides = r.train
        assert config.name.startswith("qwen2.5-7b-to-1.5b-") and config.is_file()
        assert set(overrides) <= allowed, set(overrides) - allowed
        # The shipped settings run as they are: no reporter without its package (report_to),
        # no fused_loss that minillm would refuse.
        assert not {"report_to", "fused_loss"} & set(overrides), overrides
    (servers,) = [r for r in trains if r.name.startswith("delta_kd servers")]
    assert servers.train[1]["references"] == "servers"
    assert servers.train[1]["servers.placement"] == "shared"
    assert servers.train[1]["servers.output"] == "hidden"
    assert servers.nproc == 2 and servers.servers == 3
    (seqkd,) = [r for r in trains if r.name.startswith("seqkd")]
    assert seqkd.train[1]["method_args.keep_truncated"] == "true"


def test_launch_width_counts_the_shared_frozen_weights_once(tmp_path: Path, monkeypatch) -> None:
    """The frozen models' weights are memory-mapped file pages every process of a row shares;
    only the student and activations are per process. 18 GiB free holds two delta_kd local
    processes (3.8 shared + 2 x 6.8), 10 GiB one, and the table says why."""
    import deltakd.rehearse.run as run

    (row,) = [r for r in run.plan(tmp_path, tmp_path / "runs", quick=False, nproc=2, steps=2)
              if r.name.startswith("delta_kd local")]  # fmt: skip
    monkeypatch.setattr(run, "_mem_available_gb", lambda: 18.0)
    run._launch_width(row)
    assert row.nproc == 2 and not row.note
    assert "--nproc_per_node=2" in row.commands[0]
    monkeypatch.setattr(run, "_mem_available_gb", lambda: 10.0)
    row.nproc = 2
    run._launch_width(row)
    assert row.nproc == 1 and row.note.startswith("1 of 2 processes: 3.8 GiB shared + 6.8 GiB each")
