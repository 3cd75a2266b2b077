"""deltakd: Delta Knowledge Distillation (arXiv 2509.14526) and the KD baselines."""

from deltakd._requirements import check_requirements

__version__ = "0.1.0"

check_requirements()
