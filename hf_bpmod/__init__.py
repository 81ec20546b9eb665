"""hf_bpmod: BP-modified local losses (Ren & Li) for image classifiers inside the HuggingFace Trainer."""

from .adapters import ArchitectureAdapter, get_adapter, register_adapter
from .chain import BlockChain
from .local_grad import ChainGradients, local_gradients, loss_targets

__all__ = [
    "ArchitectureAdapter",
    "BlockChain",
    "ChainGradients",
    "get_adapter",
    "local_gradients",
    "loss_targets",
    "register_adapter",
]
