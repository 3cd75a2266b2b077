"""The floors deltakd's code really runs on, checked when the package is imported.

pip enforces `pyproject.toml`'s ranges at install time, but an environment assembled another
way (a cluster image, `pip install --no-deps`, a pinned vLLM) can hold older libraries; the
first symptom would then be a deep `TypeError` from `TrainingArguments`. The versions are read
from the installed metadata (no heavy import).
"""

from __future__ import annotations

from importlib import metadata

from packaging.version import Version

#: distribution -> (oldest version the code is tested on, why)
FLOORS: dict[str, tuple[str, str]] = {
    # train_sampling_strategy exists from 5.2; TrainingArguments renamed gradient_checkpointing to
    # activation_checkpointing in 5.20 (both spellings are handled). 5.19 is the oldest version
    # the test suite runs on (it is what vLLM 0.32 needs); 5.24 the newest.
    "transformers": ("5.19.0", "TrainingArguments(train_sampling_strategy=...), tested from 5.19"),
}


def check_requirements(version_of: object = metadata.version) -> None:
    """Raise ImportError naming the package, both versions and the fix when one is too old."""
    for name, (floor, why) in FLOORS.items():
        try:
            have = version_of(name)  # type: ignore[operator]
        except metadata.PackageNotFoundError:
            continue  # the import itself will say it is missing
        if Version(have).release < Version(floor).release:
            raise ImportError(
                f"deltakd needs {name}>={floor} (it uses {why}), but {name} {have} is "
                f"installed: `pip install '{name}>={floor}'`."
            )
