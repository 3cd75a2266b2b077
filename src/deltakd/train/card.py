"""The saved student's `README.md`: a Hub model card (huggingface_hub's `ModelCard`).

Front matter (`ModelCardData`): base_model, library_name, tags, datasets. Body: the teachers,
the method and its settings, the data, steps, final losses and evaluation scores, so that
`push_to_hub` publishes something a reader understands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["model_card", "write_model_card"]

_ROLES = ("teacher_ft", "teacher_raw", "teacher_ft2", "student_raw")


def _hub_like(name: str | None) -> str | None:
    """A Hub repo id (`org/name`) as the card's metadata wants; local paths and `mini:` are not."""
    if not name or name.startswith(("mini:", "mini2:", "/", ".", "<")) or Path(name).exists():
        return None
    return name if name.count("/") == 1 else None


def model_card(config: Any, history: list[dict[str, Any]], global_step: int,
               roles: tuple[str, ...] = (), adapter: bool = False) -> Any:  # fmt: skip
    """The `huggingface_hub.ModelCard` of a trained student."""
    from huggingface_hub import ModelCard, ModelCardData

    base = config.student_init
    datasets = [d for d in (_hub_like(p.split(":", 1)[-1]) for p in config.dataset.split("+")) if d]
    tags = ["deltakd", "distillation", config.method]
    if adapter:
        tags += ["lora", "peft"]
    data = ModelCardData(
        base_model=_hub_like(base),
        library_name="peft" if adapter else "transformers",
        tags=tags,
        datasets=datasets or None,
        pipeline_tag="text-generation",
    )
    train_logs = [h for h in history if "loss" in h]
    last = train_logs[-1] if train_logs else {}
    evals = [h for h in history if any(k.startswith("eval_") for k in h)]
    lines = [
        f"# {Path(str(config.output_dir)).name or 'student'}",
        "",
        f"A student distilled with [deltakd](https://arxiv.org/abs/2509.14526) "
        f"(method `{config.method}`) from `{base}`.",
        "",
        "## Models",
        "",
        f"- student (starts from): `{base}`" + (" + LoRA adapters" if adapter else ""),
    ]
    for role in _ROLES:
        path = getattr(config, role, None)
        if path and (role in roles or role == "teacher_ft"):
            lines.append(f"- {role}: `{path}`")
    settings = {"method": config.method, "divergence": config.divergence, "lam": config.lam,
                "temperature": config.temperature, "learning_rate": config.learning_rate,
                "per_device_batch_size": config.per_device_batch_size,
                "gradient_accumulation_steps": config.gradient_accumulation_steps,
                "max_length": config.max_length, "precision": config.precision}  # fmt: skip
    if config.method in ("delta_kd", "parallelogram"):
        settings["alpha"] = config.alpha
        settings["delta_floor"] = config.delta_floor  # None (off) is not listed
    if config.variant:
        settings["variant"] = config.variant
    if adapter:
        settings["peft"] = dict(config.peft)
    lines += ["", "## Method and settings", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | `{v}` |" for k, v in settings.items() if v is not None]
    lines += ["", "## Data", "", f"- dataset: `{config.dataset}`"]
    if config.eval_dataset:
        lines.append(f"- evaluation: `{config.eval_dataset}`")
    lines += ["", "## Training", "", f"- optimizer steps: {global_step}"]
    for key in ("loss", "sft_loss", "kd_loss"):
        if key in last:
            lines.append(f"- final {key}: {last[key]:.4f} (step {last.get('step', global_step)})")
    if evals:
        e = evals[-1]
        lines += ["", "## Evaluation", "", f"At step {e.get('step', global_step)}:", "",
                  "| metric | value |", "|---|---|"]  # fmt: skip
        lines += [f"| {k} | {v:.4f} |" for k, v in sorted(e.items())
                  if k.startswith("eval_") and isinstance(v, float)
                  and not k.endswith(("runtime", "per_second"))]  # fmt: skip
    body = "\n".join(lines) + "\n"
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def write_model_card(directory: str | Path, config: Any, history: list[dict[str, Any]],
                     global_step: int, roles: tuple[str, ...] = (),
                     adapter: bool = False) -> Path:  # fmt: skip
    """Write `directory/README.md`; returns its path."""
    path = Path(directory) / "README.md"
    model_card(config, history, global_step, roles, adapter).save(path)
    return path
