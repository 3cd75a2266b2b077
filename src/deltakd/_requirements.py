"""The floors deltakd's code really runs on, checked when the package is imported.

pip enforces `pyproject.toml`'s ranges at install time, but an environment assembled another
way (a cluster image, `pip install --no-deps`, a pinned vLLM) can hold older libraries; the
first symptom would then be a deep `TypeError` from `TrainingArguments`. The versions are read
from the installed metadata (no heavy import).
"""

from __future__ import annotations

from importlib import metadata

#: distribution -> (oldest version the code runs on, why)
FLOORS: dict[str, tuple[str, str]] = {
    # TrainingArguments(activation_checkpointing=...) first exists in 5.23;
    # train_sampling_strategy in 5.2.
    "transformers": ("5.23.0", "TrainingArguments(activation_checkpointing=...)"),
}


def _parse(version: str) -> tuple[int, ...]:
    out = []
    for part in version.split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit()) if not part.isdigit() else part
        if not digits:
            break
        out.append(int(digits))
        if not part.isdigit():
            break  # 5.24.0rc1 -> (5, 24, 0)
    return tuple(out)


def check_requirements(version_of: object = metadata.version) -> None:
    """Raise ImportError naming the package, both versions and the fix when one is too old."""
    for name, (floor, why) in FLOORS.items():
        try:
            have = version_of(name)  # type: ignore[operator]
        except metadata.PackageNotFoundError:
            continue  # the import itself will say it is missing
        if _parse(have) < _parse(floor):
            raise ImportError(
                f"deltakd needs {name}>={floor} (it uses {why}), but {name} {have} is "
                f"installed: `pip install '{name}>={floor}'`."
            )
