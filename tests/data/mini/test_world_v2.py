"""World v2: its corpus, its quick build, the `mini2:` specs and the shipped models."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from deltakd.data.mini import MINI_TASKS, load_task, mini_world_dir
from deltakd.data.mini.build import ROLES_V2, SCALES_V2
from deltakd.errors import ConfigError

# vLLM's CPU attention backend runs these head sizes only
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128)


def _head_size(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def test_chat_turn_matches_the_chat_template() -> None:
    from transformers import AutoTokenizer

    from deltakd.data.mini.tokenizer import CHAT_TURN

    tok = AutoTokenizer.from_pretrained(mini_world_dir() / "tokenizer")
    msgs = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]
    assert CHAT_TURN.format(p="Q?", r="A.") == tok.apply_chat_template(msgs, tokenize=False)


def test_v2_corpus_holds_worked_examples_but_no_evaluation_prompt() -> None:
    from deltakd.data.mini.corpus import make_corpus_v2

    docs = make_corpus_v2(0, n_docs=2000)
    assert docs == make_corpus_v2(0, n_docs=2000)  # seeded
    assert docs != make_corpus_v2(0, n_docs=2000, stream="heldout")
    chat = [d for d in docs if d.startswith("<|im_start|>user\n")]
    assert len(chat) == 100  # the 5 % chat share
    assert sum("\nAnswer: " in d for d in docs) > 300  # worked math in plain text
    text = "\n".join(docs)
    # only evaluation prompts are held out: short train questions recur as on the web
    train = [r["messages"][0]["content"] for r in load_task("instruct", "train", limit=400)]
    assert sum(p in text for p in train) > 10
    for task in MINI_TASKS:
        for split in ("validation", "test"):
            for row in load_task(task, split):
                assert row["messages"][0]["content"] not in text, (task, split)


def test_quick_v2_build(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from deltakd.data.mini import build_world

    out = build_world(tmp_path / "w", seed=3, scale="quick", world="v2")
    info = json.loads((out / "world.json").read_text())
    assert info["world"] == "v2" and info["build"] == json.loads(
        json.dumps(asdict(SCALES_V2["quick"]))
    )
    assert set(info["parameters"]) == set(ROLES_V2)
    for role in ROLES_V2:
        model = AutoModelForCausalLM.from_pretrained(out / role)
        assert _head_size(model.config) in VLLM_CPU_HEAD_SIZES, role
        assert 0.0 <= info["test_scores"][role]["instruct"]["rouge1"] <= 1.0
        assert info["heldout_corpus_loss"][role] > 0
    assert info["parameters"]["student_raw_2x"] > 1.5 * info["parameters"]["student_raw"]
    assert (out / "teacher_ft" / "model.safetensors").read_bytes() != (
        out / "teacher_ft2" / "model.safetensors"
    ).read_bytes()
    # one finetuned teacher rebuilt alone (settings and replay from world.json) is the model
    # build_world made
    from deltakd.data.mini.build import build_role

    ft2 = out / "teacher_ft2" / "model.safetensors"
    before = ft2.read_bytes()
    ft2.unlink()
    build_role(out, "teacher_ft2")
    assert ft2.read_bytes() == before


def test_mini2_specs_resolve_to_the_v2_world() -> None:
    from deltakd.data.vocab import resolve_model_path

    v2 = mini_world_dir("v2")
    assert v2.name == "mini_v2"
    for role in (*ROLES_V2, "tokenizer"):
        assert Path(resolve_model_path(f"mini2:{role}")) == v2 / role
    # v1 specs are untouched, and v1 has no 2x student
    assert Path(resolve_model_path("mini:student_raw")) == mini_world_dir() / "student_raw"
    with pytest.raises(ConfigError, match="mini2:student_raw_2x"):
        resolve_model_path("mini2:student_raw_3x")
    with pytest.raises(ConfigError, match="world v1 has no 'student_raw_2x'"):
        resolve_model_path("mini:student_raw_2x")
    with pytest.raises(ConfigError, match="use one of v1, v2"):
        mini_world_dir("v3")


def test_shipped_v2_world(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    world = mini_world_dir("v2")
    info = json.loads((world / "world.json").read_text())
    assert info["world"] == "v2"
    # the same token ids as v1: the two worlds' tokenizers are one file
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (world / "tokenizer" / name).read_bytes() == (
            mini_world_dir() / "tokenizer" / name
        ).read_bytes()
    tok = AutoTokenizer.from_pretrained(world / "tokenizer")
    params = info["parameters"]
    for role in ROLES_V2:
        model = AutoModelForCausalLM.from_pretrained(world / role)
        assert model.config.model_type == "qwen2"
        assert _head_size(model.config) in VLLM_CPU_HEAD_SIZES, role
        assert sum(p.numel() for p in model.parameters()) == params[role]
        assert model.get_input_embeddings().weight.shape[0] == len(tok)
    # 1.5B : 7B is 1 : 4.7; 3B : 7B is 1 : 2.5
    assert 4 <= params["teacher_raw"] / params["student_raw"] <= 7
    assert 1.7 <= params["student_raw_2x"] / params["student_raw"] <= 2.3
    # the teacher's SFT is a local shift: it keeps the base model's language (issue 16 §3)
    losses = info["heldout_corpus_loss"]
    for role in ("teacher_ft", "teacher_ft2"):
        assert losses[role] <= 1.3 * losses["teacher_raw"], role
        for task in MINI_TASKS:  # and it still learned the tasks
            ft = info["test_scores"][role][task]["rouge1"]
            assert ft > info["test_scores"]["student_raw"][task]["rouge1"] + 0.05, (role, task)
    total = sum(p.stat().st_size for p in world.rglob("*") if p.is_file())
    assert total < 15 * 2**20


def test_cli_mini_build_world_flag() -> None:
    from deltakd.cli import build_parser

    assert build_parser().parse_args(["mini", "build"]).world == "v1"
    assert build_parser().parse_args(["mini", "build", "--world", "v2"]).world == "v2"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["mini", "build", "--world", "v3"])


def test_unknown_world_is_refused(tmp_path: Path) -> None:
    from deltakd.data.mini import build_world

    with pytest.raises(ConfigError, match="use one of v1, v2"):
        build_world(tmp_path, world="v9")


REPO = Path(__file__).resolve().parents[3]


def test_v2_configs_are_the_v1_configs_on_the_v2_models() -> None:
    import yaml

    from deltakd.config.overrides import load_config

    names = sorted(p.name for p in (REPO / "configs/mini").glob("*.yaml"))
    assert sorted(p.name for p in (REPO / "configs/mini_v2").glob("*.yaml")) == names
    for name in names:
        v1 = yaml.safe_load((REPO / "configs/mini" / name).read_text())
        v2 = yaml.safe_load((REPO / "configs/mini_v2" / name).read_text())
        roles = {k for k, v in v1.items() if isinstance(v, str) and v.startswith("mini:")}
        roles -= {"dataset", "eval_dataset"}
        assert roles >= {"student_raw", "teacher_ft", "teacher_raw", "tokenizer"}, name
        for k in roles:
            assert v2[k] == v1[k].replace("mini:", "mini2:"), (name, k)
        assert v2["output_dir"] == v1["output_dir"].replace("runs/mini/", "runs/mini_v2/")
        # MiniLLM's pretraining term reads each world's own corpus.
        pt = v1.get("method_args", {}).get("pt_dataset")
        if pt is not None:
            assert v2["method_args"].pop("pt_dataset") == pt.replace("mini:", "mini2:"), name
            v1["method_args"].pop("pt_dataset")
        same = set(v1) - roles - {"output_dir"}
        assert {k: v2[k] for k in same} == {k: v1[k] for k in same}, name  # same tasks/settings
        load_config(REPO / "configs/mini_v2" / name)  # valid against the schema


def test_v2_delta_kd_config_trains(tmp_path: Path) -> None:
    from deltakd.cli import main

    out = tmp_path / "run"
    assert main(["train", str(REPO / "configs/mini_v2/delta_kd.yaml"), f"output_dir={out}",
                 "max_steps=1", "limit=16", "per_device_batch_size=2",
                 "progress=false"]) == 0  # fmt: skip
    assert (out / "final" / "config.json").is_file()
