"""Architecture adapters, one file each, behind a registry keyed by ``config.model_type``."""

from .base import ADAPTERS, ArchitectureAdapter, BlockGranularity, get_adapter, register_adapter, unwrap_model
from .beit import BeitAdapter, unshare_relative_position_bias
from .convnext import ConvNextAdapter, ConvNextV2Adapter
from .deit import DeiTAdapter
from .dinov2 import Dinov2Adapter
from .regnet import RegNetAdapter
from .resnet import ResNetAdapter
from .swin import SwinAdapter, Swinv2Adapter
from .vit import EncoderAdapter, ViTAdapter

__all__ = [
    "ADAPTERS",
    "ArchitectureAdapter",
    "BeitAdapter",
    "BlockGranularity",
    "ConvNextAdapter",
    "ConvNextV2Adapter",
    "DeiTAdapter",
    "Dinov2Adapter",
    "EncoderAdapter",
    "RegNetAdapter",
    "ResNetAdapter",
    "SwinAdapter",
    "Swinv2Adapter",
    "ViTAdapter",
    "get_adapter",
    "register_adapter",
    "unshare_relative_position_bias",
    "unwrap_model",
]
