"""Training: AdamW groups, warm-up + cosine, a DDP-ready loop with exact resume, folder checkpoints.

from memlm.config import load_config
from memlm.train import Trainer
Trainer(load_config("configs/tiny.yaml")).fit()
"""

from memlm.train.loop import Trainer

__all__ = ["Trainer"]
