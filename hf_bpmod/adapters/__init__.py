"""Architecture adapters, one file each, behind a registry keyed by ``config.model_type``."""

from .base import ADAPTERS, ArchitectureAdapter, BlockGranularity, get_adapter, register_adapter, unwrap_model
from .convnext import ConvNextAdapter, ConvNextV2Adapter
from .regnet import RegNetAdapter
from .resnet import ResNetAdapter
from .swin import SwinAdapter, Swinv2Adapter
from .vit import ViTAdapter

__all__ = [
    "ADAPTERS",
    "ArchitectureAdapter",
    "BlockGranularity",
    "ConvNextAdapter",
    "ConvNextV2Adapter",
    "RegNetAdapter",
    "ResNetAdapter",
    "SwinAdapter",
    "Swinv2Adapter",
    "ViTAdapter",
    "get_adapter",
    "register_adapter",
    "unwrap_model",
]
