"""hf_bpmod: BP-modified local losses (Ren & Li) for image classifiers inside the HuggingFace Trainer."""

__version__ = "0.1.0"

from ._files import SymlinkRefusedError  # noqa: E402
from .adapters import ArchitectureAdapter, get_adapter, register_adapter  # noqa: E402
from .chain import BlockChain  # noqa: E402
from .checkpoint import BPModStateError  # noqa: E402
from .config import BPModifiedTrainingArguments  # noqa: E402
from .guard import NonFiniteTrainingError  # noqa: E402
from .local_grad import ChainGradients, local_gradients, loss_targets  # noqa: E402
from .offset import BlockOffset, OffsetStatistics, ScalingProblem, block_offset  # noqa: E402
from .run_lock import OutputDirInUseError  # noqa: E402
from .trainer import BPModifiedTrainer  # noqa: E402

__all__ = [
    "__version__",
    "BPModifiedTrainer",
    "BPModifiedTrainingArguments",
    "BPModStateError",
    "NonFiniteTrainingError",
    "OutputDirInUseError",
    "SymlinkRefusedError",
    "ArchitectureAdapter",
    "get_adapter",
    "register_adapter",
    "BlockChain",
    "local_gradients",
    "loss_targets",
    "ChainGradients",
    "block_offset",
    "BlockOffset",
    "OffsetStatistics",
    "ScalingProblem",
]
