"""Run `deltakd.train.train` from a JSON config; launched by torchrun in test_distributed.py.

argv: CONFIG_JSON. Rank 0 writes the logged losses to `output_dir/losses.json` and the run's
summary metrics (`train_loss`, ...) to `output_dir/metrics.json`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    from deltakd.train import load_config, train

    overrides = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    result = train(load_config(None, overrides))
    if result.final_dir.exists():
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_rank() == 0:
            out = result.output_dir / "losses.json"
            out.write_text(json.dumps(result.losses()))
            (result.output_dir / "metrics.json").write_text(json.dumps(result.metrics))


if __name__ == "__main__":
    main()
