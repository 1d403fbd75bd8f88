"""Training: one `Trainer` for every family, one `Task` per family (see `task.py` for the contract).

from aigc.training import Trainer, TrainConfig, Task, Context
from aigc.training.text import train_text   # gpt / lstm on a prepared text dir
"""

from aigc.training.config import TrainConfig
from aigc.training.task import Context, Task, TaskState, Throughput, adamw
from aigc.training.trainer import Trainer, TrainResult, seed_everything

__all__ = [
    "Context",
    "Task",
    "TaskState",
    "Throughput",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "adamw",
    "seed_everything",
]
