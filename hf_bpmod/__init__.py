"""hf_bpmod: BP-modified local losses (Ren & Li) for image classifiers inside the HuggingFace Trainer."""

from .adapters import ArchitectureAdapter, get_adapter, register_adapter
from .chain import BlockChain
from .config import BPModifiedTrainingArguments
from .local_grad import ChainGradients, local_gradients, loss_targets
from .offset import BlockOffset, OffsetStatistics, ScalingProblem, block_offset
from .trainer import BPModifiedTrainer

__all__ = [
    "BPModifiedTrainer",
    "BPModifiedTrainingArguments",
    "BlockOffset",
    "OffsetStatistics",
    "ScalingProblem",
    "block_offset",
    "ArchitectureAdapter",
    "BlockChain",
    "ChainGradients",
    "get_adapter",
    "local_gradients",
    "loss_targets",
    "register_adapter",
]
