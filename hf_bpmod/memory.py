"""Counting activation memory deterministically: bytes of tensors saved for backward that are alive at once."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch


class SavedTensorMeter:
    """Peak bytes of tensors that autograd saves for backward, alive at the same time.

    Tensors that share storage with ``exclude`` (the parameters: they exist whatever the method) are not counted.
    Use as a context manager around a training step; read :attr:`peak_bytes` afterwards.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self._excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self.live_bytes = 0
        self.peak_bytes = 0

    class _Packed:
        __slots__ = ("meter", "tensor", "nbytes")

        def __init__(self, meter: SavedTensorMeter, tensor: torch.Tensor, nbytes: int) -> None:
            self.meter, self.tensor, self.nbytes = meter, tensor, nbytes
            meter.live_bytes += nbytes
            meter.peak_bytes = max(meter.peak_bytes, meter.live_bytes)

        def __del__(self) -> None:
            self.meter.live_bytes -= self.nbytes

    def _pack(self, tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        nbytes = 0 if storage.data_ptr() in self._excluded else tensor.numel() * tensor.element_size()
        return SavedTensorMeter._Packed(self, tensor.detach(), nbytes)  # detached: no reference cycle

    @staticmethod
    def _unpack(packed: SavedTensorMeter._Packed) -> torch.Tensor:
        return packed.tensor

    @contextlib.contextmanager
    def measure(self) -> Iterator[SavedTensorMeter]:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield self
