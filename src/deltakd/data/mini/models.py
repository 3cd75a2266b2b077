"""The mini world's three Qwen2 models, trained with `transformers.Trainer`.

- ``teacher_raw``: pretrained (next-token prediction) on the plain corpus.
- ``student_raw``: the same pretraining with several times fewer parameters.
- ``teacher_ft``: ``teacher_raw`` after supervised finetuning on both tasks' train splits, with
  the loss on assistant tokens only (from the chat template's ``{% generation %}`` mask).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int


# ~0.92M vs ~0.16M parameters (5.6x): a real capacity gap that still trains in minutes on a CPU.
TEACHER = ModelShape(hidden=128, layers=4, heads=4, kv_heads=2, intermediate=384)
STUDENT = ModelShape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=192)
# World v2: every head 32 wide (vLLM's CPU backend runs head sizes 32, 64, 80, 96, 112, 128
# only; v1's student has 16). Students at ~1/5.6 and ~1/2.9 of the teacher, as 1.5B and 3B
# against 7B.
TEACHER_V2 = TEACHER
STUDENT_V2 = ModelShape(hidden=64, layers=2, heads=2, kv_heads=1, intermediate=192)
STUDENT_2X_V2 = ModelShape(hidden=96, layers=2, heads=3, kv_heads=1, intermediate=288)
MAX_POSITIONS = 256
BLOCK = 128  # tokens per packed pretraining sequence


def make_model(shape: ModelShape, tokenizer: Any, *, seed: int):
    """A freshly initialised Qwen2ForCausalLM for `tokenizer` (tied embeddings, as small Qwens)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    return model


def pack_corpus(docs: list[str], tokenizer: Any, block: int = BLOCK):
    """Token ids of all documents, each ended by ``<|endoftext|>``, cut into `block`-long rows."""
    from datasets import Dataset

    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    ids: list[int] = []
    for row in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        ids.extend(row)
        ids.append(eot)
    n = len(ids) // block
    blocks = [ids[i * block : (i + 1) * block] for i in range(n)]
    return Dataset.from_dict({"input_ids": blocks, "labels": blocks})


def chat_dataset(rows: list[dict], tokenizer: Any):
    """Chat rows → input_ids and labels that count assistant tokens only (-100 elsewhere)."""
    from datasets import Dataset

    enc = tokenizer.apply_chat_template(
        [r["messages"] for r in rows],
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    labels = [
        [t if m else -100 for t, m in zip(ids, mask)]
        for ids, mask in zip(enc["input_ids"], enc["assistant_masks"])
    ]
    return Dataset.from_dict({"input_ids": enc["input_ids"], "labels": labels})


@dataclass(frozen=True)
class TrainSettings:
    max_steps: int
    batch_size: int
    learning_rate: float
    warmup_ratio: float = 0.05
    weight_decay: float = 0.01


def train(model, dataset, tokenizer: Any, settings: TrainSettings, *, seed: int, work_dir: Path):
    """Train `model` in place with `transformers.Trainer`; returns the final logged loss."""
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(work_dir),
        max_steps=settings.max_steps,
        per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, int(settings.warmup_ratio * settings.max_steps)),
        weight_decay=settings.weight_decay,
        max_grad_norm=1.0,
        logging_steps=max(1, settings.max_steps // 10),
        save_strategy="no",
        report_to="none",
        seed=seed,
        data_seed=seed,
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=False,
    )
    # Seq2Seq's collator pads `labels` with -100, which is what both packed and chat rows need.
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=collator,
        processing_class=tokenizer,
    )
    result = trainer.train()
    model.eval()
    # the last logged loss (the mean over the last logging window), not the whole-run average
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return float(logged[-1] if logged else result.training_loss)


def corpus_loss(model, tokenizer: Any, docs: list[str], *, batch_size: int = 32) -> float:
    """Mean next-token cross-entropy (nats/token) of `model` on packed `docs`."""
    data = pack_corpus(docs, tokenizer)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            ids = torch.tensor(data[start : start + batch_size]["input_ids"])  # (B, T)
            out = model(input_ids=ids, labels=ids)
            n = ids.shape[0] * (ids.shape[1] - 1)
            total += float(out.loss) * n
            count += n
    return total / max(1, count)
