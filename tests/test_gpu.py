"""On a CUDA device: fp16 (autocast + GradScaler) and bf16 train with the offset and stay close to fp32.

The ViT gets the offset only when asked (``bp_modified=None`` leaves it off for ViTs), so every run asks for it.

Deselected by default (``-m 'not gpu'`` in pyproject) and skipped without CUDA; run with ``pytest -m gpu``.
Loose tolerances: the step-0 gradient (local gradient + offset) and the first offset within 5% of fp32's, the total
update after 4 AdamW steps pointing the same way (cosine > 0.95).
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import TrainerCallback

from hf_bpmod import BPModifiedTrainer, BPModifiedTrainingArguments
from hf_bpmod.adapters.vit import find_layer_list
from hf_bpmod.testing import SyntheticImages, tiny_vit

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

AUTOCAST_DTYPE = {"fp16": torch.float16, "bf16": torch.bfloat16}


class _Capture(TrainerCallback):
    """Per optimizer step: the loss scale in use, and the gradients after the optimizer step (by then the
    GradScaler has unscaled them in place); at the first step also the offsets."""

    def __init__(self, trainer: BPModifiedTrainer) -> None:
        self.trainer, self.scales, self.grads, self.deltas = trainer, [], [], None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        scaler = self.trainer.accelerator.scaler  # fp16's GradScaler; none in bf16 or fp32
        self.scales.append(float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0)
        if self.deltas is None:
            self.deltas = [
                d.detach().float().cpu() for b in self.trainer.offset.state.blocks for d in (b.unscaled_delta() or [])
            ]

    def on_optimizer_step(self, args, state, control, **kwargs):
        params = [p for ps in self.trainer.block_chain.block_params for p in ps]
        self.grads.append([p.grad.detach().float().cpu() for p in params])


def _run(tmp_path, precision: str | None, use_cpu: bool = False):
    args = BPModifiedTrainingArguments(
        output_dir=str(tmp_path / str(precision)), per_device_train_batch_size=16, max_steps=4, learning_rate=1e-3,
        offset_batch_size=32, offset_period="2", bp_modified=True, max_grad_norm=0.0, seed=0, data_seed=0,
        use_cpu=use_cpu, report_to="none", save_strategy="no", disable_tqdm=True, logging_steps=1,
        **({precision: True} if precision else {}),
    )  # fmt: skip
    model = tiny_vit(num_layers=4, hidden_size=64)
    initial = [p.detach().float().cpu().clone() for p in model.parameters()]
    trainer = BPModifiedTrainer(model=model, args=args, train_dataset=SyntheticImages(128))
    assert trainer.uses_offset
    capture = _Capture(trainer)
    trainer.add_callback(capture)
    dtypes: list[torch.dtype] = []
    layer = find_layer_list(model.vit, model.config.num_hidden_layers)[2]
    linear = next(m for m in layer.modules() if isinstance(m, torch.nn.Linear))  # named differently across releases
    hook = linear.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    trainer.train()
    hook.remove()
    update = torch.cat([(p.detach().float().cpu() - p0).flatten() for p, p0 in zip(model.parameters(), initial)])
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return trainer, capture, dtypes, update, losses


def _relative_error(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    num = math.sqrt(sum(((x.double() - y.double()) ** 2).sum().item() for x, y in zip(a, b)))
    return num / math.sqrt(sum((y.double() ** 2).sum().item() for y in b))


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_with_the_offset_stays_close_to_fp32(tmp_path, precision):
    trainer, capture, dtypes, update, losses = _run(tmp_path, precision)
    assert trainer.args.device.type == "cuda" and trainer.accelerator.mixed_precision == precision
    # the blocks ran under autocast, in training and in the offset pass (2 refreshes x 4 micro-batches + 4 steps)
    assert dtypes == [AUTOCAST_DTYPE[precision]] * 12
    if precision == "fp16":
        assert trainer.accelerator.scaler is not None and all(s > 1.0 for s in capture.scales)
    else:
        assert capture.scales == [1.0] * 4
    _, ref_capture, ref_dtypes, ref_update, ref_losses = _run(tmp_path, None)
    assert ref_dtypes == [torch.float32] * 12
    assert capture.deltas and len(capture.deltas) == len(ref_capture.deltas)  # the offsets compared below exist
    assert all(math.isfinite(v) for v in losses) and losses[0] == pytest.approx(ref_losses[0], rel=2e-2)
    assert all(torch.isfinite(g).all() for g in capture.grads[0])
    assert _relative_error(capture.deltas, ref_capture.deltas) < 5e-2  # the first offset, at the same weights
    assert _relative_error(capture.grads[0], ref_capture.grads[0]) < 5e-2  # unscaled local gradient + offset
    assert torch.nn.functional.cosine_similarity(update, ref_update, dim=0).item() > 0.95
