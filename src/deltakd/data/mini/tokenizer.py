"""The mini world's byte-level BPE tokenizer with a Qwen-like chat template.

Digits are split one per token (as Qwen2 does), so ``57 + 30`` is always the same five digit
tokens and arithmetic does not depend on which numbers BPE happened to merge.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

SPECIAL_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# Qwen-like turns. The assistant's content plus its closing <|im_end|> sit inside
# {% generation %} so `return_assistant_tokens_mask=True` marks exactly what the model must learn
# to produce, the end-of-turn token included (otherwise a finetuned model never learns to stop).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{{ '\\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

#: One user turn and its answer as CHAT_TEMPLATE renders them (a test checks they agree): the
#: chat-formatted share of world v2's pretraining corpus, written without a tokenizer at hand.
CHAT_TURN = "<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n{r}<|im_end|>\n"


def train_tokenizer(texts: Iterable[str], out_dir: str | Path, *, vocab_size: int = 1024):
    """Train a byte-level BPE on `texts`, wrap it as a `PreTrainedTokenizerFast`, save it.

    Returns the HF tokenizer (eos ``<|im_end|>``, pad ``<|endoftext|>``, no bos).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        model_max_length=512,
    )
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(out_dir)
    return hf
