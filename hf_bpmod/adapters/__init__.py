"""Architecture adapters, one file each, behind a registry keyed by ``config.model_type``."""

from .base import ADAPTERS, ArchitectureAdapter, BlockGranularity, get_adapter, register_adapter, unwrap_model
from .beit import BeitAdapter, unshare_relative_position_bias
from .deit import DeiTAdapter
from .dinov2 import Dinov2Adapter
from .resnet import ResNetAdapter
from .vit import EncoderAdapter, ViTAdapter

__all__ = [
    "ADAPTERS",
    "ArchitectureAdapter",
    "BeitAdapter",
    "BlockGranularity",
    "DeiTAdapter",
    "Dinov2Adapter",
    "EncoderAdapter",
    "ResNetAdapter",
    "ViTAdapter",
    "get_adapter",
    "register_adapter",
    "unshare_relative_position_bias",
    "unwrap_model",
]
