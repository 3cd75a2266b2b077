"""`deltakd rehearse build DIR`: the paper's models and datasets at their real shapes, offline.

What is written, all under DIR (use it as `HF_HOME=DIR HF_HUB_OFFLINE=1`):

- `hub/models--<org>--<name>/snapshots/<rev>/` (+ `refs/main`): the Hugging Face hub cache
  layout, so `AutoModelForCausalLM.from_pretrained("Qwen/Qwen2.5-7B")` resolves unchanged.
  Each repo has its published `config.json` except `num_hidden_layers` (the rehearsal depth),
  random weights in bf16 (`model.safetensors`), its `generation_config.json` and its family's
  tokenizer files.
- Tokenizers of the real sizes with the real special tokens at their ids: Qwen2.5's 151,643
  regular tokens + 22 added (151,665) and the Qwen2.5-Instruct chat template; Llama 3's 128,000
  + 256 (128,256) and the Llama 3.1 template. The regular tokens are a byte-level BPE trained
  on the rehearsal's text, padded with filler tokens to the real count.
- `datasets/`: `HuggingFaceH4/ultrachat_200k` and `nvidia/OpenMathReasoning` with their
  published splits and columns, as `load_dataset` leaves them after a first online load (the
  prepared cache it reads offline); the parquet files are also kept in the hub cache layout
  (`hub/datasets--<org>--<name>/snapshots/<rev>/data/<split>-*.parquet` + README configs), which
  loads as a local dataset directory.
- `rehearsal.json`: what was built (depth, parameters, rows and token lengths).

Lengths follow the real data: UltraChat chats of several turns around 1.5k tokens,
OpenMathReasoning chain-of-thought solutions of several thousand tokens ending in a nested
`\\boxed{...}` answer.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from deltakd.rehearse import shapes

#: dataset repo -> split -> rows written
ULTRACHAT = "HuggingFaceH4/ultrachat_200k"
OPENMATH = "nvidia/OpenMathReasoning"
DATASET_ROWS: dict[str, dict[str, int]] = {
    ULTRACHAT: {"train_sft": 192, "test_sft": 32, "train_gen": 16, "test_gen": 16},
    OPENMATH: {"cot": 96, "tir": 8, "genselect": 8, "additional_problems": 8},
}
#: The quick world (`deltakd rehearse build --quick`, the test suite's fixture): every model
#: at its real shape, every split with its schema, but a few rows each; enough for the quick
#: rehearsal (2 steps of 1 row) and the schema / length checks.
QUICK_ROWS: dict[str, dict[str, int]] = {
    ULTRACHAT: {"train_sft": 16, "test_sft": 4, "train_gen": 4, "test_gen": 4},
    OPENMATH: {"cot": 8, "tir": 2, "genselect": 2, "additional_problems": 2},
}
ANSWERS = (r"\frac{3}{4}", r"\frac{1}{2}", r"\frac{5}{12}", r"\sqrt{2}", "17")


def revision(repo: str) -> str:
    """A fixed 40-hex commit id per repo (the hub cache keys snapshots by commit)."""
    return hashlib.sha1(f"deltakd-rehearsal:{repo}".encode()).hexdigest()


def snapshot_dir(root: Path, repo: str, kind: str = "models") -> Path:
    return Path(root) / "hub" / f"{kind}--{repo.replace('/', '--')}" / "snapshots" / revision(repo)


def _commit_snapshot(root: Path, repo: str, kind: str = "models") -> Path:
    """Create the snapshot directory and point `refs/main` at it."""
    snap = snapshot_dir(root, repo, kind)
    snap.mkdir(parents=True, exist_ok=True)
    refs = snap.parent.parent / "refs"
    refs.mkdir(parents=True, exist_ok=True)
    (refs / "main").write_text(revision(repo))
    return snap


# --- text ----------------------------------------------------------------------------------


_SYLLABLES_TEXT = "ka lo mi ne ra to su vi de pa ri no te la ma si ko be an en in on ar er or us is tion ment ly ful ing ed al ic ous ter pre con dis com pro"


_COMMON_TEXT = "the of and to in is that it for as with was on be by this are from at or an have not which but can they more one all their there would also when what some if about"


class Text:
    """Seeded English-like text: words from syllables, sentences, paragraphs, math steps."""

    SYLLABLES: tuple[str, ...] = tuple(_SYLLABLES_TEXT.split(" "))
    COMMON: tuple[str, ...] = tuple(_COMMON_TEXT.split(" "))

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        words = set()
        while len(words) < 3000:
            words.add("".join(self.rng.choices(self.SYLLABLES, k=self.rng.randint(1, 4))))
        self.words = sorted(words)

    def sentence(self) -> str:
        n = self.rng.randint(8, 22)
        out = [
            self.rng.choice(self.COMMON) if self.rng.random() < 0.4 else self.rng.choice(self.words)
            for _ in range(n)
        ]
        if self.rng.random() < 0.15:
            out.insert(self.rng.randint(0, n), str(self.rng.randint(2, 2024)))
        s = " ".join(out)
        return s[0].upper() + s[1:] + self.rng.choice(".....?!")

    def paragraph(self, sentences: int) -> str:
        return " ".join(self.sentence() for _ in range(sentences))

    def words_about(self, n: int) -> str:
        """About `n` words of text in paragraphs (and sometimes a list)."""
        parts, count = [], 0
        while count < n:
            if self.rng.random() < 0.2:
                items = [f"{i + 1}. {self.sentence()}" for i in range(self.rng.randint(3, 6))]
                parts.append("\n".join(items))
            else:
                parts.append(self.paragraph(self.rng.randint(3, 7)))
            count = sum(len(p.split()) for p in parts)
        return "\n\n".join(parts)

    def math_step(self) -> str:
        a, b, c = (self.rng.randint(2, 99) for _ in range(3))
        forms = (
            f"Let $x = {a}$, so $x^2 + {b}x = {a * a + b * a}$.",
            rf"Then $\frac{{{a}}}{{{b}}} + \frac{{{c}}}{{{b}}} = \frac{{{a + c}}}{{{b}}}$.",
            rf"Hence $\sqrt{{{a * a}}} = {a}$ and ${a} \cdot {b} = {a * b}$.",
            f"Wait, let me check: ${a} + {b} = {a + b}$, and ${a + b} - {c} = {a + b - c}$.",
            rf"So the sum is $\sum_{{k=1}}^{{{a}}} k = {a * (a + 1) // 2}$.",
        )
        return self.rng.choice(forms) + " " + self.sentence()


# --- tokenizers ----------------------------------------------------------------------------


def _train_bpe(corpus: Iterable[str], pattern: str, vocab_size: int) -> tuple[dict, list]:
    """A byte-level BPE's (vocab, merges) trained on `corpus` with a family's split regex."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    model = json.loads(tok.to_str())["model"]
    return model["vocab"], model["merges"]


def build_tokenizer(
    corpus: Sequence[str], family: str, out_dir: Path, *, eos: str, trained_vocab: int = 8000
) -> Any:
    """A fast tokenizer with the family's real vocabulary size and special tokens at their ids.

    The BPE part is trained on `corpus`; filler tokens (never produced: no merge leads to
    them) pad the regular vocabulary to the real count. Returns the `PreTrainedTokenizerFast`.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.processors import ByteLevel, TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    if family == "qwen":
        regular, special, pattern = (
            shapes.QWEN_REGULAR,
            shapes.QWEN_SPECIAL,
            shapes.QWEN_PRETOKENIZE,
        )
    else:
        regular, special = shapes.LLAMA_REGULAR, shapes.LLAMA_SPECIAL
        pattern = shapes.LLAMA_PRETOKENIZE
    vocab, merges = _train_bpe(corpus, pattern, trained_vocab)
    vocab = dict(vocab)
    i = 0
    while len(vocab) < regular:
        vocab.setdefault(f"ĠfillerĠ{i}", len(vocab))
        i += 1
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [AddedToken(content, special=sp, normalized=False) for content, sp in special]
    )
    if family == "llama":
        # Llama 3 prepends <|begin_of_text|> when asked for special tokens.
        tok.post_processor = TemplateProcessing(
            single="<|begin_of_text|> $A",
            pair="<|begin_of_text|> $A <|begin_of_text|> $B",
            special_tokens=[("<|begin_of_text|>", regular)],
        )
    else:
        tok.post_processor = ByteLevel(trim_offsets=False)
    if tok.get_vocab_size() != regular + len(special):
        raise AssertionError(f"tokenizer has {tok.get_vocab_size()} tokens")
    if family == "qwen":
        extra = {
            "pad_token": "<|endoftext|>",
            "bos_token": None,
            "chat_template": shapes.QWEN_CHAT_TEMPLATE,
            "model_max_length": 131072,
            "errors": "replace",
            "split_special_tokens": False,
            "clean_up_tokenization_spaces": False,
            "tokenizer_class": "Qwen2Tokenizer",
        }
    else:
        extra = {
            "bos_token": "<|begin_of_text|>",
            "chat_template": shapes.LLAMA_CHAT_TEMPLATE,
            "model_max_length": 131072,
            "clean_up_tokenization_spaces": True,
            "model_input_names": ["input_ids", "attention_mask"],
            "tokenizer_class": "PreTrainedTokenizerFast",
        }
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, **{
        k: v for k, v in extra.items() if k not in ("tokenizer_class",)
    })  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    # The Hub repos name their tokenizer class and keep the template in tokenizer_config.json.
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = extra["tokenizer_class"]
    cfg["chat_template"] = extra["chat_template"]
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    (out_dir / "chat_template.jinja").unlink(missing_ok=True)
    return fast


# --- models --------------------------------------------------------------------------------


def write_model(snap: Path, config: dict[str, Any], layers: int, seed: int) -> int:
    """Random bf16 weights for `config` at depth `layers` into `snap/model.safetensors`;
    returns the parameter count. Initialised like the models' own init (normal, std
    `initializer_range`; norms at 1; biases small), so logits are finite and varied."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = {**config, "num_hidden_layers": layers}
    if "max_window_layers" in cfg:
        cfg["max_window_layers"] = min(cfg["max_window_layers"], layers)
    (snap / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    hf_cfg = AutoConfig.from_pretrained(snap)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_cfg)
    gen = torch.Generator().manual_seed(seed)
    std = float(cfg.get("initializer_range", 0.02))
    tensors: dict[str, torch.Tensor] = {}
    for name, p in model.state_dict().items():
        if cfg.get("tie_word_embeddings") and name == "lm_head.weight":
            continue
        t = torch.empty(p.shape, dtype=torch.bfloat16)
        if name.endswith("norm.weight"):
            t.fill_(1.0)
        else:
            _fill_normal(t, std, gen)
        tensors[name] = t
    n = sum(t.numel() for t in tensors.values())
    save_file(tensors, str(snap / "model.safetensors"), metadata={"format": "pt"})
    return n


#: Elements drawn per block by `_fill_normal`.
_POOL = 1 << 20


def _fill_normal(t: Any, std: float, gen: Any) -> None:
    """Fill `t` with N(0, std²) values: blocks of `_POOL` elements copied from one pool of
    normal draws at random offsets. Drawing every element (`normal_`) of the ~5.8 B parameters
    took 57 s of the 110 s build on one core; the copies take a tenth of that. Rows stay
    distinct (each block starts at its own offset), so logits are as finite and varied as with
    independent draws, which is all random weights are for here."""
    import torch

    flat = t.view(-1)
    n = flat.numel()
    if n <= _POOL:
        flat.normal_(0.0, std, generator=gen)
        return
    pool = torch.empty(2 * _POOL, dtype=t.dtype).normal_(0.0, std, generator=gen)
    offsets = torch.randint(0, _POOL, ((n + _POOL - 1) // _POOL,), generator=gen).tolist()
    for i, o in enumerate(offsets):
        lo = i * _POOL
        hi = min(lo + _POOL, n)
        flat[lo:hi] = pool[o : o + hi - lo]


# --- datasets ------------------------------------------------------------------------------


def _ultrachat_rows(text: Text, n: int) -> list[dict[str, Any]]:
    rows = []
    for _ in range(n):
        turns = text.rng.randint(2, 4)
        messages = []
        for t in range(turns):
            q = text.words_about(text.rng.randint(20, 90))
            if t == 0:
                q = f"Write about {text.rng.choice(text.words)}. " + q
            messages.append({"content": q, "role": "user"})
            messages.append(
                {"content": text.words_about(text.rng.randint(150, 320)), "role": "assistant"}
            )
        prompt = messages[0]["content"]
        rows.append(
            {
                "prompt": prompt,
                "prompt_id": hashlib.sha256(prompt.encode()).hexdigest(),
                "messages": messages,
            }
        )
    return rows


def _openmath_rows(text: Text, n: int, mode: str) -> list[dict[str, Any]]:
    rows = []
    for _ in range(n):
        answer = text.rng.choice(ANSWERS)
        problem = (
            text.paragraph(text.rng.randint(2, 4))
            + f" Find the value of ${text.rng.choice('xyzn')}$."
        )
        if mode == "additional_problems":
            solution, model = "", "n/a"
        else:
            steps = [text.math_step() for _ in range(text.rng.randint(70, 150))]
            think = "\n\n".join(" ".join(steps[i : i + 3]) for i in range(0, len(steps), 3))
            solution = (
                f"<think>\n{think}\n</think>\n"
                + text.paragraph(3)
                + f"\n\nTherefore, the final answer is $\\boxed{{{answer}}}$."
            )
            model = "DeepSeek-R1" if mode == "cot" else "QwQ-32B-Preview"
        rows.append(
            {
                "expected_answer": answer,
                "problem_type": "has_answer_extracted",
                "problem_source": text.rng.choice(
                    [
                        "aops_c4_high_school_math",
                        "aops_c6_high_school_olympiads",
                        "MATH_training_set",
                    ]
                ),
                "generation_model": model,
                "pass_rate_72b_tir": text.rng.choice(["0.5", "0.75", "0.90625", "n/a"]),
                "problem": problem,
                "generated_solution": solution,
                "inference_mode": {"cot": "cot", "tir": "tir", "genselect": "genselect"}.get(
                    mode, "cot"
                ),
                "used_in_kaggle": text.rng.random() < 0.3,
            }
        )
    return rows


def _features(repo: str) -> Any:
    import datasets

    s = datasets.Value("string")
    if repo == ULTRACHAT:
        return datasets.Features(
            {
                "prompt": s,
                "prompt_id": s,
                "messages": datasets.List({"content": s, "role": s}),
            }
        )
    return datasets.Features(
        {
            "expected_answer": s,
            "problem_type": s,
            "problem_source": s,
            "generation_model": s,
            "pass_rate_72b_tir": s,
            "problem": s,
            "generated_solution": s,
            "inference_mode": s,
            "used_in_kaggle": datasets.Value("bool"),
        }
    )


def write_dataset(root: Path, repo: str, splits: dict[str, list[dict[str, Any]]]) -> Path:
    """The repo's parquet files in the hub cache layout, then `load_dataset`'s prepared cache
    under `root/datasets` as an online first load leaves it (what it reads offline)."""
    import datasets

    snap = _commit_snapshot(root, repo, "datasets")
    (snap / "data").mkdir(exist_ok=True)
    features = _features(repo)
    card = ["---", "configs:", "- config_name: default", "  data_files:"]
    for split, rows in splits.items():
        ds = datasets.Dataset.from_list(rows, features=features)
        ds.to_parquet(str(snap / "data" / f"{split}-00000-of-00001.parquet"))
        card += [f"  - split: {split}", f"    path: data/{split}-*"]
    card += ["---", f"# {repo} (deltakd rehearsal stand-in: published schema, synthetic rows)", ""]
    (snap / "README.md").write_text("\n".join(card))
    cache = Path(root) / "datasets"
    builder = datasets.load_dataset_builder(str(snap), cache_dir=str(cache))
    builder.download_and_prepare()
    # A Hub load caches under `<org>___<name>`; a local directory under its own name.
    namespace, name = repo.split("/")
    local_dir = cache / snap.name
    hub_dir = cache / f"{namespace}___{_snake(name)}"
    if hub_dir.exists():
        shutil.rmtree(hub_dir)
    local_dir.rename(hub_dir)
    # ... and names its arrow files and split infos after the dataset, not the directory.
    for info_path in hub_dir.glob("*/*/*/dataset_info.json"):
        info = json.loads(info_path.read_text())
        info["dataset_name"] = _snake(name)
        for split_info in info["splits"].values():
            split_info["dataset_name"] = _snake(name)
        info_path.write_text(json.dumps(info))
        for arrow in info_path.parent.glob(f"{snap.name}-*.arrow"):
            arrow.rename(arrow.with_name(_snake(name) + arrow.name[len(snap.name) :]))
    for lock in cache.glob("*.lock"):
        lock.unlink()
    return snap


def _snake(name: str) -> str:
    from datasets.naming import camelcase_to_snakecase

    return camelcase_to_snakecase(name)


# --- the world -----------------------------------------------------------------------------


def build(
    root: str | Path,
    *,
    families: Sequence[str] = ("qwen", "llama"),
    datasets_: Sequence[str] = (ULTRACHAT, OPENMATH),
    layers: int = 1,
    seed: int = 0,
    rows: dict[str, dict[str, int]] | None = None,
    log: Any = print,
) -> dict[str, Any]:
    """Build the rehearsal world into `root`; returns (and writes) `rehearsal.json`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    text = Text(seed)
    counts = {**DATASET_ROWS, **(rows or {})}
    info: dict[str, Any] = {"layers": layers, "seed": seed, "models": {}, "datasets": {}}

    data: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for repo in datasets_:
        if repo == ULTRACHAT:
            data[repo] = {s: _ultrachat_rows(text, n) for s, n in counts[repo].items()}
        else:
            data[repo] = {s: _openmath_rows(text, n, s) for s, n in counts[repo].items()}
    # The tokenizer learns from the same kind of text the datasets hold.
    corpus = [text.words_about(200) for _ in range(300)] + [
        " ".join(text.math_step() for _ in range(30)) for _ in range(100)
    ]

    tokenizers: dict[str, Any] = {}
    for repo, spec in shapes.REPOS.items():
        family = spec["family"]
        if family not in families:
            continue
        snap = _commit_snapshot(root, repo)
        tok = build_tokenizer(corpus, family, snap, eos=spec["eos"])
        tokenizers.setdefault(family, tok)
        (snap / "generation_config.json").write_text(
            json.dumps({**spec["generation"], "transformers_version": "4.43.1"}, indent=2) + "\n"
        )
        t = time.perf_counter()
        n = write_model(snap, spec["config"], layers, seed=int(revision(repo)[:8], 16) + seed)
        info["models"][repo] = {"parameters": n, "tokenizer_size": len(tok)}
        log(f"  {repo:36s} {n / 1e9:6.2f} B parameters  ({time.perf_counter() - t:.0f} s)")

    tok = tokenizers.get("qwen") or next(iter(tokenizers.values()), None)
    for repo, splits in data.items():
        write_dataset(root, repo, splits)
        lengths = {}
        for split, split_rows in splits.items():
            if tok is None or not split_rows:
                continue
            if repo == ULTRACHAT:
                msgs = [r["messages"] for r in split_rows]
            else:
                msgs = [
                    [{"role": "user", "content": r["problem"]},
                     {"role": "assistant", "content": r["generated_solution"]}]
                    for r in split_rows if r["generated_solution"]
                ]  # fmt: skip
            if not msgs:
                continue
            n_tok = sorted(
                len(
                    tok(tok.apply_chat_template(m, tokenize=False), add_special_tokens=False)[
                        "input_ids"
                    ]
                )
                for m in msgs
            )
            lengths[split] = {"rows": len(split_rows), "median_tokens": n_tok[len(n_tok) // 2],
                              "max_tokens": n_tok[-1]}  # fmt: skip
        info["datasets"][repo] = lengths
        log(f"  {repo:36s} {json.dumps(lengths)}")
    info["seconds"] = round(time.perf_counter() - t0, 1)
    (root / "rehearsal.json").write_text(json.dumps(info, indent=1) + "\n")
    return info
