"""The paper's recipe at real shapes, offline: `deltakd rehearse build DIR` / `run DIR`.

from deltakd.rehearse.world import build      # models, tokenizers, datasets
from deltakd.rehearse.run import rehearse     # the configs under torchrun, one table
"""
