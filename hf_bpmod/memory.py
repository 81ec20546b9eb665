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


class SavedStorageMeter(SavedTensorMeter):
    """Like :class:`SavedTensorMeter`, but counts what is really held: each storage once, in full.

    Autograd often saves one tensor for several nodes (the input of ``q_proj``, ``k_proj`` and ``v_proj``), or a view
    of a larger tensor; :class:`SavedTensorMeter` adds ``numel * element_size`` per save, so it counts the first
    several times and the second by its view. This meter keeps a reference count per storage and adds the storage's
    ``nbytes`` while at least one saved reference to it is alive. Storages of ``exclude`` are not counted.

    Only tensors packed through saved-tensor hooks are seen: regions that install their own hooks (non-reentrant
    ``torch.utils.checkpoint``) hide what they save from it; reentrant checkpointing is counted correctly.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        super().__init__(exclude)
        self._refs: dict[int, int] = {}

    class _StoragePacked:
        __slots__ = ("meter", "tensor", "key", "nbytes")

        def __init__(self, meter: SavedStorageMeter, tensor: torch.Tensor, key: int | None, nbytes: int) -> None:
            self.meter, self.tensor, self.key, self.nbytes = meter, tensor, key, nbytes
            if key is not None:
                count = meter._refs.get(key, 0)
                if count == 0:
                    meter.live_bytes += nbytes
                    meter.peak_bytes = max(meter.peak_bytes, meter.live_bytes)
                meter._refs[key] = count + 1

        def __del__(self) -> None:
            if self.key is None:
                return
            count = self.meter._refs[self.key] - 1
            if count == 0:
                del self.meter._refs[self.key]
                self.meter.live_bytes -= self.nbytes
            else:
                self.meter._refs[self.key] = count

    def _pack(self, tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        key = None if ptr in self._excluded or storage.nbytes() == 0 else ptr
        return SavedStorageMeter._StoragePacked(self, tensor.detach(), key, storage.nbytes())

    @staticmethod
    def _unpack(packed: SavedStorageMeter._StoragePacked) -> torch.Tensor:
        return packed.tensor


def peak_saved_bytes(
    model: torch.nn.Module, horizon: int | None, pixel_values: torch.Tensor, labels: torch.Tensor
) -> int:
    """Peak bytes saved for backward (each storage once, parameters excluded) in one local-gradient step of
    ``model`` at horizon ``horizon`` (``None``: the number of blocks, i.e. backprop), with fresh auxiliary heads."""
    from .adapters import get_adapter
    from .local_grad import local_gradients

    adapter = get_adapter(model)
    dtype = next(model.parameters()).dtype
    if horizon is None:
        horizon = adapter.chain(model).num_blocks
    chain = adapter.chain(model, adapter.aux_heads(model, horizon).to(dtype))
    params = list(model.parameters()) + [p for ps in chain.head_params for p in ps]
    meter = SavedStorageMeter(exclude=params)
    loss_fn = lambda logits: torch.nn.functional.cross_entropy(logits, labels)  # noqa: E731
    with meter.measure():
        local_gradients(chain, pixel_values, loss_fn, horizon, accumulate=True)
    return meter.peak_bytes
