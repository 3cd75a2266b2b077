"""deltakd: Delta Knowledge Distillation (arXiv 2509.14526) and the KD baselines."""

__version__ = "0.1.0"
