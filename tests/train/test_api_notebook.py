"""The notebook API (`DeltaKDTrainer`, `DeltaKDConfig`) and what TRL users expect of it:
objects or paths, LoRA students, TrainingArguments pass-through, evaluation during training,
a readable console, a model card, length-grouped batches. All on the shipped mini world."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from deltakd import DeltaKDConfig, DeltaKDTrainer
from deltakd.config import config_from_dict
from deltakd.data.specs import load_rows
from deltakd.errors import ConfigError
from deltakd.loading import load_model, load_tokenizer
from deltakd.train.api import train
from deltakd.train.notebook import AdapterDisabled, training_arguments

MINI = {"student_raw": "mini:student_raw", "teacher_ft": "mini:teacher_ft",
        "teacher_raw": "mini:teacher_raw"}  # fmt: skip

#: a short delta_kd run on the mini world (with MINI's paths for the YAML side)
RUN: dict[str, Any] = {
    "method": "delta_kd",
    "alpha": 1.0,
    "max_steps": 3,
    "per_device_batch_size": 4,
    "max_length": 128,
    "learning_rate": 3e-3,
    "lr_scheduler": "constant",
    "logging_steps": 1,
    "save_steps": 0,
    "progress": False,
    "device": "cpu",
    "resume": "never",
}


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], Path]:
    """16 mini:instruct rows, as a list and as the JSONL file the YAML path reads."""
    data = [{"messages": r["messages"]} for r in load_rows("mini:instruct", limit=16)]
    path = tmp_path_factory.mktemp("nb") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in data), encoding="utf-8")
    return data, path


def test_yaml_and_notebook_paths_give_the_same_weights(rows, tmp_path):
    from datasets import Dataset

    data, path = rows
    yaml_run = train(config_from_dict({**RUN, **MINI, "dataset": str(path),
                                       "output_dir": str(tmp_path / "yaml")}))  # fmt: skip
    from_yaml = load_model(str(yaml_run.final_dir)).state_dict()

    # objects where a notebook has them: the student and one teacher loaded, one as a path
    trainer = DeltaKDTrainer(
        model=load_model("mini:student_raw"),
        teacher_ft=load_model("mini:teacher_ft", frozen=True),
        teacher_raw="mini:teacher_raw",
        args=DeltaKDConfig(**RUN, output_dir=str(tmp_path / "nb")),
        train_dataset=Dataset.from_list(data),
        processing_class=load_tokenizer("mini:student_raw"),
    )
    trainer.train()
    from_notebook = trainer.model.state_dict()
    assert trainer.state.global_step == yaml_run.global_step == 3
    assert from_yaml.keys() == from_notebook.keys()
    for name, value in from_yaml.items():
        torch.testing.assert_close(from_notebook[name], value, rtol=0, atol=1e-6, msg=name)
    # and the weights moved: the comparison is not between two untouched students
    start = load_model("mini:student_raw").state_dict()
    assert any(not torch.equal(start[k], v) for k, v in from_yaml.items())


def test_bad_arguments_are_named_with_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="Did you mean 'learning_rate'"):
        DeltaKDConfig(output_dir=str(tmp_path), lerning_rate=1e-3)
    with pytest.raises(ConfigError, match="'per_device_batch_size'"):
        DeltaKDConfig(output_dir=str(tmp_path), per_device_train_batch_size=8)
    with pytest.raises(ConfigError, match="needs the teacher_ft model"):
        DeltaKDTrainer(model="mini:student_raw",
                       args=DeltaKDConfig(output_dir=str(tmp_path), method="kd"))  # fmt: skip
    with pytest.raises(ConfigError, match="eval_steps=5 needs validation rows"):
        DeltaKDTrainer(model="mini:student_raw", args=DeltaKDConfig(
            output_dir=str(tmp_path), method="sft", lam=1.0, eval_steps=5))  # fmt: skip
    with pytest.raises(ConfigError, match="DeltaKDConfig"):
        DeltaKDTrainer(model="mini:student_raw", args={"output_dir": str(tmp_path)})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "method",
    [
        {"method": "sft", "lam": 1.0},
        {"method": "kd"},
        {"method": "parallelogram", "variant": "live_anchor_sg"},
        {"method": "seqkd", "method_args": {"keep_truncated": True}},
        {"method": "minillm"},
        {"method": "delta_kd", "on_policy_ratio": 1.0},
    ],
    ids=lambda m: m["method"] + ("+on_policy" if "on_policy_ratio" in m else ""),
)
def test_every_method_trains_from_the_notebook_api(rows, tmp_path, method):
    data, _ = rows
    args = DeltaKDConfig(**{**RUN, **method, "max_steps": 1, "max_new_tokens": 8},
                         output_dir=str(tmp_path))  # fmt: skip
    trainer = DeltaKDTrainer(model="mini:student_raw", teacher_ft="mini:teacher_ft",
                             teacher_raw="mini:teacher_raw", args=args,
                             train_dataset=data[:4])  # fmt: skip
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    assert trainer.state.global_step == 1
    after = trainer.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_training_args_and_model_kwargs_pass_through(tmp_path):
    base = {**RUN, **MINI, "output_dir": str(tmp_path)}
    config = config_from_dict({**base, "training_args": {"optim": "adafactor",
                                                         "torch_compile": False}})  # fmt: skip
    args = training_arguments(config)
    assert args.optim == "adafactor" and args.per_device_train_batch_size == 4
    with pytest.raises(ConfigError, match=r"Did you mean 'training_args\.optim'"):
        config_from_dict({**base, "training_args": {"optimizer": "adafactor"}})
    with pytest.raises(ConfigError, match="use the deltakd key 'lr_scheduler'"):
        config_from_dict({**base, "training_args": {"lr_scheduler_type": "linear"}})
    # a DeltaKDConfig keyword lands in the same place
    assert DeltaKDConfig(output_dir=str(tmp_path), optim="adafactor").training_args == {
        "optim": "adafactor"
    }
    # model loading kwargs reach from_pretrained (torch_dtype is spelled dtype in transformers 5)
    config = config_from_dict({**base, "method": "sft", "lam": 1.0, "dataset": "mini:instruct",
                               "limit": 8, "model_kwargs": {"attn_implementation": "eager",
                                                            "torch_dtype": "fp32"}})  # fmt: skip
    assert config.model_kwargs == {"attn_implementation": "eager", "dtype": "fp32"}
    trainer = DeltaKDTrainer(args=config)
    assert trainer.model.config._attn_implementation == "eager"
    with pytest.raises(ConfigError, match=r"model_kwargs\.dtype"):
        config_from_dict({**base, "model_kwargs": {"dtype": "float8"}})


def test_lora_student_shares_its_base_as_student_raw_and_saves_adapters(rows, tmp_path):
    from datasets import Dataset

    data, _ = rows
    args = DeltaKDConfig(**RUN, output_dir=str(tmp_path / "lora"),
                         peft={"r": 4, "target_modules": ["q_proj", "v_proj"]})  # fmt: skip
    trainer = DeltaKDTrainer(model="mini:student_raw", teacher_ft="mini:teacher_ft",
                             teacher_raw="mini:teacher_raw", args=args,
                             train_dataset=Dataset.from_list(data))  # fmt: skip
    refs = trainer.references
    # no third frozen model: student_raw is the student with its adapters disabled
    assert isinstance(refs.models["student_raw"], AdapterDisabled)
    assert set(refs.models) == {"student_raw", "teacher_ft", "teacher_raw"}
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    trainer.train()

    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    frozen = load_model("mini:student_raw", frozen=True)
    with torch.no_grad():
        expected = frozen(input_ids=ids, attention_mask=mask).logits
        shared = refs.models["student_raw"](input_ids=ids, attention_mask=mask).logits
        trainer.model.eval()
        trained = trainer.model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(shared, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(trained, expected, atol=1e-4)  # the adapters learned something
    assert trainer.model.training is False and all(
        p.requires_grad for n, p in trainer.model.named_parameters() if "lora_" in n
    )  # the reference's eval()/requires_grad_(False) never reached the student

    adapters = trainer.save_student(tmp_path / "adapters")
    assert (adapters / "adapter_config.json").is_file()
    assert not (adapters / "model.safetensors").exists()
    merged = trainer.save_student(tmp_path / "merged", merge=True)
    assert not (merged / "adapter_config.json").exists()
    reloaded = load_model(str(merged))
    with torch.no_grad():
        got = reloaded(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, trained, rtol=1e-4, atol=1e-4)
    assert "library_name: peft" in (adapters / "README.md").read_text(encoding="utf-8")


def test_lora_from_yaml_peft_section(tmp_path):
    config = config_from_dict({**RUN, **MINI, "method": "sft", "lam": 1.0,
                               "dataset": "mini:instruct", "limit": 8, "max_steps": 1,
                               "output_dir": str(tmp_path), "peft": {"r": 2, "merge": True}})  # fmt: skip
    assert config.peft.lora_config().lora_alpha == 4  # default alpha = 2r
    result = train(config)
    assert (result.final_dir / "model.safetensors").is_file()  # merged
    with pytest.raises(ConfigError, match=r"peft\.r"):
        config_from_dict({**RUN, **MINI, "output_dir": str(tmp_path), "peft": {"alpha": 8}})
    with pytest.raises(ConfigError, match=r"peft\.dropuot.*Did you mean 'peft\.dropout'"):
        config_from_dict(
            {**RUN, **MINI, "output_dir": str(tmp_path), "peft": {"r": 8, "dropuot": 0.1}}
        )


def test_evaluation_during_training_and_best_checkpoint(tmp_path, capsys):
    config = config_from_dict({**RUN, **MINI, "dataset": "mini:math", "limit": 24,
                               "max_steps": 4, "eval_dataset": "mini:math", "eval_limit": 4,
                               "eval_steps": 2, "save_steps": 2, "eval_generate_samples": 2,
                               "max_new_tokens": 8, "metric_for_best_model": "eval_kd_loss",
                               "output_dir": str(tmp_path)})  # fmt: skip
    result = train(config)
    evals = [h for h in result.history if "eval_loss" in h]
    assert [h["step"] for h in evals] == [2, 4]
    for h in evals:
        # lam = 0 and one eval batch: the loss is the KD term, token-weighted
        assert h["eval_kd_loss"] == pytest.approx(h["eval_loss"], rel=1e-5)
        assert h["eval_sft_loss"] > 0
        assert 0.0 <= h["eval_rouge1"] <= 1.0 and 0.0 <= h["eval_exact_match"] <= 1.0
    best = min(evals, key=lambda h: h["eval_kd_loss"])
    state = json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["best_model_checkpoint"].endswith(f"checkpoint-{best['step']}")
    card = (result.final_dir / "README.md").read_text(encoding="utf-8")
    assert "## Evaluation" in card and "eval_kd_loss" in card
    # eval_steps: 0 evaluates once, at the end
    config = config.replace(eval_steps=0, save_steps=0, metric_for_best_model=None,
                            eval_generate_samples=0, output_dir=str(tmp_path / "end"))  # fmt: skip
    end = train(config)
    assert [h["step"] for h in end.history if "eval_loss" in h] == [4]
    assert "eval_kd_loss" in end.metrics
    with pytest.raises(ConfigError, match="save_steps a multiple of it"):
        config_from_dict({**RUN, **MINI, "eval_dataset": "mini:math", "eval_steps": 3,
                          "save_steps": 2, "metric_for_best_model": "eval_loss",
                          "output_dir": str(tmp_path)})  # fmt: skip


def test_console_prints_one_summary_line_and_no_dicts(tmp_path, capsys):
    train(config_from_dict({**RUN, **MINI, "dataset": "mini:instruct", "limit": 12,
                            "output_dir": str(tmp_path)}))  # fmt: skip
    captured = capsys.readouterr()
    lines = [line for line in captured.out.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("[train] delta_kd: 3 steps"), lines
    assert "loss" in lines[0] and "tok/s" in lines[0] and "reference wait" in lines[0]
    assert "{'loss'" not in captured.out + captured.err
    assert "Loading weights" not in captured.err and "Writing model shards" not in captured.err


def test_model_card_and_push_to_hub_option(tmp_path):
    from huggingface_hub import ModelCard

    result = train(config_from_dict({**RUN, **MINI, "dataset": "mini:instruct", "limit": 12,
                                     "output_dir": str(tmp_path)}))  # fmt: skip
    card = ModelCard.load(result.final_dir / "README.md")
    assert card.data.library_name == "transformers"
    assert {"deltakd", "distillation", "delta_kd"} <= set(card.data.tags)
    assert "teacher_ft: `mini:teacher_ft`" in card.text
    assert "teacher_raw: `mini:teacher_raw`" in card.text
    assert "| alpha | `1.0` |" in card.text and "optimizer steps: 3" in card.text
    assert "final kd_loss" in card.text
    # push_to_hub reaches TrainingArguments (not exercised online)
    config = config_from_dict({**RUN, **MINI, "output_dir": str(tmp_path / "p"),
                               "push_to_hub": True, "hub_model_id": "me/student"})  # fmt: skip
    args = training_arguments(config)
    assert args.push_to_hub is True and args.hub_model_id == "me/student"
    with pytest.raises(ConfigError, match="hub_model_id"):
        config_from_dict({**RUN, **MINI, "output_dir": str(tmp_path), "push_to_hub": True})


def test_group_by_length_logs_less_padding(tmp_path):
    from datasets import Dataset

    # lengths spread 1 to 40 words, so random batches pad a lot and grouped ones little
    # (400 rows: the sampler sorts within mega-batches of 50 batches, fewer on tiny datasets)
    data = [{"prompt": f"say {n % 40 + 1} words", "response": " ".join(["word"] * (n % 40 + 1))}
            for n in range(400)]  # fmt: skip
    pads = {}
    for grouped in (False, True):
        args = DeltaKDConfig(**{**RUN, "method": "sft", "lam": 1.0, "max_steps": 10},
                             group_by_length=grouped, output_dir=str(tmp_path / str(grouped)))  # fmt: skip
        trainer = DeltaKDTrainer(model="mini:student_raw", args=args,
                                 train_dataset=Dataset.from_list(data))  # fmt: skip
        assert trainer.args.train_sampling_strategy == ("group_by_length" if grouped else "random")
        trainer.train()
        logged = [h["pad_fraction"] for h in trainer.state.log_history if "pad_fraction" in h]
        assert len(logged) == 10 and all(0.0 <= p < 1.0 for p in logged)
        pads[grouped] = sum(logged) / len(logged)
    assert pads[True] < 0.5 * pads[False], pads


def test_rerunning_a_finished_lora_run_saves_its_adapters_again(tmp_path):
    config = config_from_dict({**RUN, **MINI, "method": "sft", "lam": 1.0,
                               "dataset": "mini:instruct", "limit": 8, "max_steps": 1,
                               "resume": "auto", "output_dir": str(tmp_path),
                               "peft": {"r": 2}})  # fmt: skip
    first = train(config)
    again = train(config)
    assert again.resumed_from is not None and again.global_step == first.global_step == 1
    assert (again.final_dir / "adapter_config.json").is_file()


def test_verbose_brings_the_library_output_back(tmp_path):
    import transformers.utils.logging as tf_logging

    from deltakd.train.console import quiet_libraries

    try:
        quiet_libraries(verbose=False)
        assert tf_logging.get_verbosity() == tf_logging.ERROR
        assert not tf_logging.is_progress_bar_enabled()
        quiet_libraries(verbose=True)
        assert tf_logging.get_verbosity() == tf_logging.INFO
        assert tf_logging.is_progress_bar_enabled()
    finally:
        quiet_libraries(verbose=False)
    config = config_from_dict({**RUN, **MINI, "output_dir": str(tmp_path), "verbose": True})
    args = training_arguments(config)
    assert args.log_level == "info"


def test_cli_verbose_flag_after_the_overrides(tmp_path, capsys):
    from deltakd.cli import main

    yaml_file = Path(__file__).resolve().parents[2] / "configs" / "mini" / "sft.yaml"
    assert main(["train", str(yaml_file), f"output_dir={tmp_path}", "--verbose",
                 "--print-config"]) == 0  # fmt: skip
    assert "verbose: true" in capsys.readouterr().out


def test_model_card_metadata_names_hub_models_and_datasets(tmp_path):
    from deltakd.train.card import model_card

    config = config_from_dict({**RUN, "student_raw": "Qwen/Qwen2.5-1.5B",
                               "teacher_ft": "Qwen/Qwen2.5-7B-Instruct",
                               "teacher_raw": "Qwen/Qwen2.5-7B",
                               "dataset": "ultrachat:HuggingFaceH4/ultrachat_200k",
                               "peft": {"r": 16}, "output_dir": str(tmp_path / "qwen-dkd")})  # fmt: skip
    history = [{"step": 10, "loss": 1.5, "kd_loss": 1.4, "sft_loss": 2.0},
               {"step": 10, "eval_loss": 1.6, "eval_rouge1": 0.42}]  # fmt: skip
    card = model_card(config, history, 10, ("teacher_ft", "teacher_raw", "student_raw"),
                      adapter=True)  # fmt: skip
    assert card.data.base_model == "Qwen/Qwen2.5-1.5B"
    assert card.data.datasets == ["HuggingFaceH4/ultrachat_200k"]
    assert card.data.library_name == "peft" and "lora" in card.data.tags
    text = str(card)
    assert "teacher_raw: `Qwen/Qwen2.5-7B`" in text and "| eval_rouge1 | 0.4200 |" in text
    assert "final kd_loss: 1.4000" in text and text.startswith("---\n")


def test_lora_run_resumes_exactly_from_an_adapter_checkpoint(tmp_path):
    from safetensors.torch import load_file

    fields = {**RUN, **MINI, "dataset": "mini:instruct", "limit": 16, "peft": {"r": 2},
              "resume": "auto"}  # fmt: skip
    straight = train(config_from_dict({**fields, "output_dir": str(tmp_path / "a")}))
    train(config_from_dict({**fields, "max_steps": 2, "save_steps": 1,
                            "output_dir": str(tmp_path / "b")}))  # fmt: skip
    resumed = train(config_from_dict({**fields, "save_steps": 1,
                                      "output_dir": str(tmp_path / "b")}))  # fmt: skip
    assert resumed.resumed_from is not None and resumed.resumed_from.endswith("checkpoint-2")
    a = load_file(straight.final_dir / "adapter_model.safetensors")
    b = load_file(resumed.final_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)


def test_lora_shared_base_feeds_the_fused_loss_with_hidden_states(rows, tmp_path):
    from datasets import Dataset

    data, _ = rows
    losses = {}
    for fused in (False, True):
        args = DeltaKDConfig(**RUN, output_dir=str(tmp_path / str(fused)), fused_loss=fused,
                             peft={"r": 4, "target_modules": ["q_proj", "v_proj"]})  # fmt: skip
        trainer = DeltaKDTrainer(model="mini:student_raw", teacher_ft="mini:teacher_ft",
                                 teacher_raw="mini:teacher_raw", args=args,
                                 train_dataset=Dataset.from_list(data))  # fmt: skip
        if fused:  # student_raw answers with hidden states through the adapter-free base
            assert "student_raw" in trainer.references.lm_heads()
        trainer.train()
        losses[fused] = [h["kd_loss"] for h in trainer.state.log_history if "kd_loss" in h]
    assert len(losses[True]) == 3
    for a, b in zip(losses[False], losses[True]):
        assert b == pytest.approx(a, rel=1e-4)
