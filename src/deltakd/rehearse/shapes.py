"""The real Hub files of the models the paper's configs name, except depth and weights.

Each `config.json` below is the published one of its repo (values as on the Hub), with
`num_hidden_layers` replaced by the rehearsal's depth. Tokenizer settings and generation
configs follow the same repos. Only what the rehearsal needs is here: the three Qwen2.5 repos
the shipped configs name, and a Llama 3 family so that nothing is Qwen-specific.
"""

from __future__ import annotations

from typing import Any

QWEN_7B: dict[str, Any] = {
    "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "max_position_embeddings": 131072,
    "max_window_layers": 28,
    "model_type": "qwen2",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 131072,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.40.1",
    "use_cache": True,
    "use_mrope": False,
    "use_sliding_window": False,
    "vocab_size": 152064,
}
# The instruct repo differs in its eos (<|im_end|>), context and library version.
QWEN_7B_INSTRUCT: dict[str, Any] = {
    **QWEN_7B,
    "eos_token_id": 151645,
    "max_position_embeddings": 32768,
    "transformers_version": "4.43.1",
}
QWEN_1_5B: dict[str, Any] = {
    **QWEN_7B,
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "max_window_layers": 21,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "tie_word_embeddings": True,
    "vocab_size": 151936,
}

_LLAMA3_ROPE = {
    "factor": 8.0,
    "high_freq_factor": 4.0,
    "low_freq_factor": 1.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3",
}
LLAMA_8B: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": _LLAMA3_ROPE,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0",
    "use_cache": True,
    "vocab_size": 128256,
}
LLAMA_8B_INSTRUCT: dict[str, Any] = {**LLAMA_8B, "eos_token_id": [128001, 128008, 128009]}
LLAMA_1B: dict[str, Any] = {
    **LLAMA_8B,
    "head_dim": 64,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "rope_scaling": {**_LLAMA3_ROPE, "factor": 32.0},
    "tie_word_embeddings": True,
    "transformers_version": "4.45.0.dev0",
}

QWEN_SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

#: Qwen2.5-Instruct's chat template, as published in its tokenizer_config.json.
QWEN_CHAT_TEMPLATE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    "    {%- else %}\n"
    "        {{- '" + QWEN_SYSTEM_PROMPT + "' }}\n"
    "    {%- endif %}\n"
    '    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user '
    "query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:"
    '\\n<tools>" }}\n'
    "    {%- for tool in tools %}\n"
    '        {{- "\\n" }}\n'
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    '    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name '
    'and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": '
    '<function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}\n'
    "{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>system\\n" + QWEN_SYSTEM_PROMPT + "<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    '    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or '
    '(message.role == "assistant" and not message.tool_calls) %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + "
    "'\\n' }}\n"
    '    {%- elif message.role == "assistant" %}\n'
    "        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n"
    "            {{- '\\n' + message.content }}\n"
    "        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n"
    "            {%- endif %}\n"
    '            {{- \'\\n<tool_call>\\n{"name": "\' }}\n'
    "            {{- tool_call.name }}\n"
    '            {{- \'", "arguments": \' }}\n'
    "            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n"
    "        {%- endfor %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    '    {%- elif message.role == "tool" %}\n'
    '        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}\n'
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    '        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}\n'
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

#: Llama 3.1's chat template without its tool-calling branches (the rehearsal has no tools);
#: the system header with the knowledge-cutoff and date lines is kept.
LLAMA_CHAT_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- if not date_string is defined %}\n"
    '    {%- set date_string = "26 Jul 2024" %}\n'
    "{%- endif %}\n"
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content']|trim %}\n"
    "    {%- set messages = messages[1:] %}\n"
    "{%- else %}\n"
    '    {%- set system_message = "" %}\n'
    "{%- endif %}\n"
    '{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}\n'
    '{{- "Cutting Knowledge Date: December 2023\\n" }}\n'
    '{{- "Today Date: " + date_string + "\\n\\n" }}\n'
    "{{- system_message }}\n"
    '{{- "<|eot_id|>" }}\n'
    "{%- for message in messages %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ "
    "message['content'] | trim + '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)

#: Qwen2.5's added tokens from id 151643 on: (content, special).
QWEN_SPECIAL: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)
QWEN_REGULAR = 151643

_LLAMA_NAMED = {
    0: "<|begin_of_text|>",
    1: "<|end_of_text|>",
    4: "<|finetune_right_pad_id|>",
    6: "<|start_header_id|>",
    7: "<|end_header_id|>",
    8: "<|eom_id|>",
    9: "<|eot_id|>",
    10: "<|python_tag|>",
}
LLAMA_REGULAR = 128000


def _llama_special(i: int) -> str:
    if i in _LLAMA_NAMED:
        return _LLAMA_NAMED[i]
    # Reserved slots are numbered in order over the ids that have no name.
    return f"<|reserved_special_token_{sum(1 for j in range(i) if j not in _LLAMA_NAMED)}|>"


#: Llama 3.1's 256 special tokens from id 128000 on.
LLAMA_SPECIAL: tuple[tuple[str, bool], ...] = tuple((_llama_special(i), True) for i in range(256))

QWEN_PRETOKENIZE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA_PRETOKENIZE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _generation(bos: int, eos: Any, **extra: Any) -> dict[str, Any]:
    return {"bos_token_id": bos, "eos_token_id": eos, **extra}


#: repo id -> (config.json, generation_config.json, tokenizer family, eos token, tokenizer_config
#: extras). The tokenizer files are the family's, in every repo, as on the Hub.
REPOS: dict[str, dict[str, Any]] = {
    "Qwen/Qwen2.5-7B": {
        "config": QWEN_7B,
        "generation": _generation(151643, 151643, do_sample=False, max_new_tokens=2048),
        "family": "qwen",
        "eos": "<|endoftext|>",
    },
    "Qwen/Qwen2.5-7B-Instruct": {
        "config": QWEN_7B_INSTRUCT,
        "generation": _generation(
            151643,
            [151645, 151643],
            pad_token_id=151643,
            do_sample=True,
            repetition_penalty=1.05,
            temperature=0.7,
            top_p=0.8,
            top_k=20,
        ),
        "family": "qwen",
        "eos": "<|im_end|>",
    },
    "Qwen/Qwen2.5-1.5B": {
        "config": QWEN_1_5B,
        "generation": _generation(151643, 151643, do_sample=False, max_new_tokens=2048),
        "family": "qwen",
        "eos": "<|endoftext|>",
    },
    "meta-llama/Llama-3.1-8B": {
        "config": LLAMA_8B,
        "generation": _generation(128000, 128001, do_sample=True, temperature=0.6, top_p=0.9),
        "family": "llama",
        "eos": "<|end_of_text|>",
    },
    "meta-llama/Llama-3.1-8B-Instruct": {
        "config": LLAMA_8B_INSTRUCT,
        "generation": _generation(
            128000, [128001, 128008, 128009], do_sample=True, temperature=0.6, top_p=0.9
        ),
        "family": "llama",
        "eos": "<|eot_id|>",
    },
    "meta-llama/Llama-3.2-1B": {
        "config": LLAMA_1B,
        "generation": _generation(128000, 128001, do_sample=True, temperature=0.6, top_p=0.9),
        "family": "llama",
        "eos": "<|end_of_text|>",
    },
}

#: family -> the repos a rehearsal run uses as (teacher_ft, teacher_raw, student_raw, tokenizer)
FAMILIES: dict[str, dict[str, str]] = {
    "qwen": {
        "teacher_ft": "Qwen/Qwen2.5-7B-Instruct",
        "teacher_raw": "Qwen/Qwen2.5-7B",
        "student_raw": "Qwen/Qwen2.5-1.5B",
        "tokenizer": "Qwen/Qwen2.5-7B-Instruct",
    },
    "llama": {
        "teacher_ft": "meta-llama/Llama-3.1-8B-Instruct",
        "teacher_raw": "meta-llama/Llama-3.1-8B",
        "student_raw": "meta-llama/Llama-3.2-1B",
        "tokenizer": "meta-llama/Llama-3.1-8B-Instruct",
    },
}
