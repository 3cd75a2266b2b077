"""`evaluate`: generate replies for a dataset's prompts and score them.

A row is a dict with either `messages` (chat turns; the prompt is every turn before the last
assistant turn and the reference is that last assistant turn) or `prompt` / `response`
strings. A row may carry `answer` (the gold final answer of a math problem); when every row
has one, exact match is scored too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deltakd.errors import ConfigError, DataError
from deltakd.eval.metrics import exact_match_per_example, math_equal, rouge_per_example
from deltakd.generation import GenerationSettings, Message, generate

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Extractor = Callable[[str], "str | None"]


@dataclass
class EvalResult:
    """Mean scores (fractions in [0, 1]) and one record per example."""

    rouge1: float
    rouge2: float
    rougeL: float  # the spelling every ROUGE table uses
    exact_match: float | None
    n: int
    records: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def metrics(self) -> dict[str, Any]:
        """The JSON summary: `rouge1`, `rouge2`, `rougeL`, `exact_match` (or None), `n`."""
        return {
            "rouge1": self.rouge1,
            "rouge2": self.rouge2,
            "rougeL": self.rougeL,
            "exact_match": self.exact_match,
            "n": self.n,
        }

    def save(self, out_dir: str | Path) -> Path:
        """Write `predictions.jsonl`, `summary.md` and `metrics.json` under out_dir."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "predictions.jsonl", "w", encoding="utf-8") as f:
            for rec in self.records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        (out / "metrics.json").write_text(
            json.dumps({**self.metrics(), "meta": self.meta}, indent=2) + "\n", encoding="utf-8"
        )
        (out / "summary.md").write_text(self.summary_markdown(), encoding="utf-8")
        return out

    def summary_markdown(self, examples: int = 3) -> str:
        lines = ["# Evaluation summary", ""]
        for key in ("model", "data", "split"):
            if key in self.meta:
                lines.append(f"- {key}: `{self.meta[key]}`")
        if "generation" in self.meta:
            gen = ", ".join(f"{k}={v}" for k, v in self.meta["generation"].items())
            lines.append(f"- generation: {gen}")
        lines += [
            f"- examples: {self.n}",
            "",
            "| metric | value (×100) |",
            "|---|---|",
            f"| ROUGE-1 F1 | {100 * self.rouge1:.2f} |",
            f"| ROUGE-2 F1 | {100 * self.rouge2:.2f} |",
            f"| ROUGE-L F1 | {100 * self.rougeL:.2f} |",
        ]
        if self.exact_match is not None:
            lines.append(f"| exact match | {100 * self.exact_match:.2f} |")
        lines += [
            "",
            "ROUGE: `rouge-score`, F1, Porter stemming on. Predictions: `predictions.jsonl`.",
        ]
        if self.records and examples > 0:
            lines += ["", "## Examples", ""]
            for rec in self.records[:examples]:
                lines += [
                    f"**Prompt:** {_one_line(rec['prompt'])}",
                    "",
                    f"**Prediction:** {_one_line(rec['prediction'])}",
                    "",
                    f"**Reference:** {_one_line(rec['reference'])}",
                    "",
                ]
        return "\n".join(lines).rstrip() + "\n"


def _one_line(text: str, limit: int = 300) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 1] + "…"


def split_row(row: dict[str, Any], index: int = 0) -> tuple[list[Message], str]:
    """(prompt messages, reference text) of one data row."""
    if "messages" in row:
        messages = list(row["messages"])
        last = max(
            (i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None
        )
        if last is None:
            raise DataError(
                f"row {index}: `messages` has no assistant turn to use as the reference; "
                "add the reference reply as the last assistant message."
            )
        prompt = [{"role": m["role"], "content": m["content"]} for m in messages[:last]]
        if not prompt:
            raise DataError(
                f"row {index}: nothing precedes the assistant turn; put the question in a "
                "user message before it."
            )
        return prompt, str(messages[last]["content"])
    if "prompt" in row and "response" in row:
        return [{"role": "user", "content": str(row["prompt"])}], str(row["response"])
    raise DataError(
        f"row {index}: has keys {sorted(row)}; an eval row needs `messages` (chat turns ending "
        "in the reference assistant reply) or `prompt` and `response`."
    )


_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_HASHES = re.compile(r"####\s*([^\n]+)")
_ANSWER_IS = re.compile(r"answer(?: is|:)\s*\$?([-+]?[\d,]*\.?\d+)", re.IGNORECASE)
_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?|[-+]?\.\d+")


def extract_final_answer(text: str) -> str | None:
    """The final answer of a math reply: `#### X`, `\\boxed{X}`, "answer is X", else the
    last number in the text; None when there is none."""
    for pattern in (_HASHES, _BOXED, _ANSWER_IS):
        found = pattern.findall(text)
        if found:
            return found[-1].strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def extractor_for(spec: str | None) -> Extractor | None:
    """The answer extractor that matches how a dataset writes its answers."""
    if spec is not None and spec.startswith("mini:"):
        from deltakd.data.mini import extract_answer

        return extract_answer
    return None


def resolve_path(path: str | Path) -> str:
    """`mini:<role>` -> the shipped mini world's directory; local paths must exist."""
    from deltakd.data.vocab import resolve_model_path

    return resolve_model_path(str(path))


def _load_model(path: str | Path, device: str | None, dtype: str) -> PreTrainedModel:
    from deltakd.loading import choose_device, load_model

    return load_model(str(path), dtype=dtype, device=choose_device(device))


def evaluate(
    model: str | Path | PreTrainedModel,
    tokenizer: str | Path | PreTrainedTokenizerBase | None,
    rows: Iterable[dict[str, Any]],
    *,
    settings: GenerationSettings | None = None,
    extract: Extractor | None = None,
    exact: bool | None = None,
    out_dir: str | Path | None = None,
    meta: dict[str, Any] | None = None,
    device: str | None = None,
    dtype: str = "float32",
    progress: bool = True,
) -> EvalResult:
    """Generate a reply to every row's prompt and score it against the reference.

    `model` / `tokenizer` are loaded objects or paths (`tokenizer=None` loads it from the
    model's directory). Exact match is scored when `exact` is True, or when `exact` is None
    and every row has a non-null `answer`; `extract` pulls the final answer out of a
    reply (default: `math_equal` judges the whole reply). With `out_dir`, the predictions and a summary
    are written there.
    """
    from deltakd.loading import load_tokenizer

    rows = list(rows)
    if not rows:
        raise DataError("no rows to evaluate; check the data spec, split and --limit.")
    settings = settings or GenerationSettings()
    meta = dict(meta or {})
    if isinstance(model, (str, Path)):
        meta.setdefault("model", str(model))
        if tokenizer is None:
            tokenizer = model
        if settings.backend != "vllm":  # the vLLM engine loads the model itself
            model = _load_model(model, device, dtype)
    if tokenizer is None:
        tokenizer = getattr(model, "name_or_path", None) or getattr(model, "model_name", None)
        if not tokenizer:
            raise ConfigError("evaluate() got a model object without a tokenizer; pass one.")
    if isinstance(tokenizer, (str, Path)):
        tokenizer = load_tokenizer(str(tokenizer))

    prompts: list[list[Message]] = []
    references: list[str] = []
    for i, row in enumerate(rows):
        p, r = split_row(row, i)
        prompts.append(p)
        references.append(r)
    answers = [row.get("answer") for row in rows]
    if exact is None:
        exact = all(a is not None for a in answers)

    predictions = [g.text for g in generate(model, tokenizer, prompts, settings, progress=progress)]
    per = rouge_per_example(predictions, references)
    n = len(predictions)
    correct = None
    if exact:
        # Without a dataset's own extractor, math-verify judges the whole reply (nested
        # `\\boxed{\\frac{1}{2}}` included, which a regex reads as `2`).
        correct = (
            exact_match_per_example(predictions, answers, extract)
            if extract is not None
            else exact_match_per_example(predictions, answers, verify=math_equal)
        )

    records: list[dict[str, Any]] = []
    for i, (p, pred, ref) in enumerate(zip(prompts, predictions, references)):
        rec: dict[str, Any] = {"prompt": p[-1]["content"], "prediction": pred, "reference": ref}
        if len(p) > 1:
            rec["messages"] = p
        rec.update({k: per[k][i] for k in per})
        if correct is not None:
            rec["answer"] = answers[i]
            rec["correct"] = correct[i]
        records.append(rec)

    meta["generation"] = asdict(settings)
    result = EvalResult(
        rouge1=sum(per["rouge1"]) / n,
        rouge2=sum(per["rouge2"]) / n,
        rougeL=sum(per["rougeL"]) / n,
        exact_match=(sum(correct) / n) if correct is not None else None,
        n=n,
        records=records,
        meta=meta,
    )
    if out_dir is not None:
        result.save(out_dir)
    return result


def resolve_eval_split(spec: str, split: str | None) -> str:
    """`split`, or the spec's evaluation split when None (test / test_sft / cot)."""
    from deltakd.data.specs import parse_spec

    return split or parse_spec(spec).default_eval_split


def load_eval_rows(
    spec: str, split: str | None = None, *, limit: int | None = None, seed: int = 0
) -> list[dict[str, Any]]:
    """Rows for a data spec (`mini:TASK`, a JSONL file, `ultrachat:...`, `openmath:...`)
    through `deltakd.data.specs.load_rows`.

    `split=None` takes the spec's evaluation split (mini/jsonl `test`, ultrachat `test_sft`).
    `seed` is the mini world's seed (0 = the shipped world), not a sampling seed.
    """
    from deltakd.data.specs import load_rows

    if limit is not None and limit < 1:
        raise ConfigError(f"limit={limit}: must be >= 1, or left out for every row.")
    return load_rows(spec, resolve_eval_split(spec, split), limit=limit, seed=seed)


def evaluate_spec(
    model: str | Path | PreTrainedModel,
    tokenizer: str | Path | PreTrainedTokenizerBase | None,
    spec: str,
    *,
    split: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    **kwargs: Any,
) -> EvalResult:
    """`evaluate` on a data spec, with the spec's own answer extractor."""
    split = resolve_eval_split(spec, split)
    rows = load_eval_rows(spec, split, limit=limit, seed=seed)
    meta = {"data": spec, "split": split, **kwargs.pop("meta", {})}
    kwargs.setdefault("extract", extractor_for(spec))
    return evaluate(model, tokenizer, rows, meta=meta, **kwargs)
