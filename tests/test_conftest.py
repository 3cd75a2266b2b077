"""The shared tiny world loads through the same path a user's model takes."""

from transformers import AutoModelForCausalLM, AutoTokenizer


def test_tiny_world_loads_and_shares_vocab(tiny_world):
    tok = AutoTokenizer.from_pretrained(tiny_world["tokenizer"])
    assert len(tok) == tiny_world["vocab_size"]
    for role in ("teacher_ft", "teacher_raw", "student_raw"):
        model = AutoModelForCausalLM.from_pretrained(tiny_world[role])
        assert model.config.vocab_size == tiny_world["vocab_size"]
    msgs = [
        {"role": "user", "content": "what colour is the fox?"},
        {"role": "assistant", "content": "the fox is red."},
    ]
    out = tok.apply_chat_template(msgs, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assistant_text = tok.decode([i for i, m in zip(ids, mask) if m])
    assert assistant_text == "the fox is red.<|im_end|>"
