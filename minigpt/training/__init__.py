"""The library's trainer: `Trainer` runs a `Task` (e.g. `LanguageModelTask`) under a `TrainConfig`.

`python -m minigpt.train` (`minigpt.cli.train`) builds one from flags; `minigpt.book` keeps
the tutorial's simple loop.
"""

from .checkpoints import list_checkpoints
from .config import TrainConfig, TrainState
from .optim import configure_optimizer, lr_at
from ..data import stack_examples
from .sampler import batch_order
from .tasks import LanguageModelTask, Task
from .trainer import Trainer

__all__ = ["Trainer", "TrainConfig", "TrainState", "Task", "LanguageModelTask", "configure_optimizer", "lr_at",
           "batch_order", "stack_examples", "list_checkpoints"]
