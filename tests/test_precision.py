"""Mixed precision on CPU: bf16 autocast reaches the blocks; fp16 loss scaling applies the offset at the right scale.

fp16 autocast needs a GPU (accelerate turns it off on CPU, see tests/test_gpu.py), so the scaling logic is tested
with a real ``torch.amp.GradScaler("cpu")`` on fp32 computations: powers of two scale exactly, so the unscaled
gradients (local gradient + offset) and the trained parameters must equal those of the unscaled run to rounding.
"""

from __future__ import annotations

import contextlib
import math
from types import SimpleNamespace

import pytest
import torch
from transformers import TrainerCallback

import hf_bpmod.offset_controller as controller_module
from hf_bpmod import BPModifiedTrainer, BPModifiedTrainingArguments
from hf_bpmod.adapters.vit import find_layer_list
from hf_bpmod.offset import BlockOffset
from hf_bpmod.offset_pass import apply_block_offsets
from hf_bpmod.precision import forward_context
from hf_bpmod.testing import SyntheticImages, tiny_vit


class _Capture(TrainerCallback):
    """The gradients the optimizer is about to use (divided by the loss scale, when there is one)."""

    def __init__(self, trainer: BPModifiedTrainer) -> None:
        self.trainer, self.grads, self.scales = trainer, [], []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        scale = self.trainer._grad_scale()
        params = [p for ps in self.trainer.block_chain.block_params for p in ps]
        self.scales.append(scale)
        self.grads.append([p.grad.detach().clone() / scale for p in params])


def _trainer(tmp_path, data, **kw) -> tuple[BPModifiedTrainer, _Capture]:
    kw.setdefault("bp_modified", True)  # the offset on the ViT: not its default
    args = BPModifiedTrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=16, learning_rate=3e-3, seed=0, data_seed=0,
        use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True, logging_steps=1, offset_batch_size=32,
        **kw,
    )  # fmt: skip
    trainer = BPModifiedTrainer(model=tiny_vit(num_layers=4), args=args, train_dataset=data)
    capture = _Capture(trainer)
    trainer.add_callback(capture)
    return trainer, capture


def _relative_error(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    num = math.sqrt(sum(((x.double() - y.double()) ** 2).sum().item() for x, y in zip(a, b)))
    return num / math.sqrt(sum((y.double() ** 2).sum().item() for y in b))


def test_the_forward_context_enters_the_trainers_context_then_the_accelerators_autocast():
    events = []

    @contextlib.contextmanager
    def context(name):
        events.append(f"enter {name}")
        yield
        events.append(f"exit {name}")

    accelerator = SimpleNamespace(autocast=lambda: context("autocast"))
    with forward_context(accelerator, lambda: context("compute_loss_context_manager")):
        assert events == ["enter compute_loss_context_manager", "enter autocast"]
    assert events[2:] == ["exit autocast", "exit compute_loss_context_manager"]


# ---------------------------------------------------------------------------------------------------------- bf16
def test_bf16_runs_the_blocks_under_cpu_autocast_and_stays_close_to_fp32(tmp_path):
    data = SyntheticImages(64)
    kw = dict(max_steps=1, offset_period="1", max_grad_norm=0.0)
    trainer, bf16 = _trainer(tmp_path / "bf16", data, bf16=True, **kw)
    assert trainer.accelerator.mixed_precision == "bf16"
    with trainer._forward_context():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    dtypes: list[torch.dtype] = []
    layer = find_layer_list(trainer.model.vit, trainer.model.config.num_hidden_layers)[1]
    query = next(m for name, m in layer.named_modules() if name.endswith(("q_proj", "query")))
    hook = query.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    trainer.train()
    hook.remove()
    # 32 offset examples in micro-batches of 8, then one training batch: every forward of the block ran in bf16
    assert dtypes == [torch.bfloat16] * 5
    reference, fp32 = _trainer(tmp_path / "fp32", data, **kw)
    reference.train()
    loss, ref_loss = (t.state.log_history[0]["loss"] for t in (trainer, reference))
    assert math.isfinite(loss) and loss == pytest.approx(ref_loss, rel=1e-2)  # measured 1e-4
    # the step's gradient (local gradient + offset) within 2% of fp32's (measured 0.5%; bf16 keeps ~3 digits)
    assert _relative_error(bf16.grads[0], fp32.grads[0]) < 2e-2
    for block, ref in zip(trainer.offset.state.blocks, reference.offset.state.blocks):
        assert block.lam == pytest.approx(ref.lam, abs=0.05)


# ---------------------------------------------------------------------------------------------------------- fp16
def test_grad_scale_reads_an_enabled_scaler_only(tmp_path):
    trainer, _ = _trainer(tmp_path, SyntheticImages(64), max_steps=1)
    assert trainer.accelerator.scaler is None and trainer._grad_scale() == 1.0
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=256.0, enabled=False)
    assert trainer._grad_scale() == 1.0
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    assert trainer._grad_scale() == 256.0


def test_apply_block_offsets_scales_the_offset_with_the_gradients():
    g = torch.tensor([1.0, -2.0, 0.5])
    delta = torch.tensor([0.25, 0.125, -1.0])
    offset = BlockOffset(scale=0.75, weight=0.5, delta=[delta], a=0.75, lam=0.5, c=1.0, bias=0.0, var=0.0,
                         cosine=0.0, offset_norm=0.0)  # fmt: skip
    param = torch.nn.Parameter(torch.zeros(3))
    chain = SimpleNamespace(block_params=[[param]])
    param.grad = g.clone()
    apply_block_offsets(chain, [offset])
    unscaled = param.grad.clone()
    torch.testing.assert_close(unscaled, 0.75 * g + 0.5 * delta)
    param.grad = g * 1024.0  # what a loss scale of 1024 gives
    apply_block_offsets(chain, [offset], grad_scale=1024.0)
    assert torch.equal(param.grad / 1024.0, unscaled)


def test_fp16_loss_scaling_applies_the_offset_at_the_current_scale(tmp_path):
    """A GradScaler whose scale doubles after every step (2^10 .. 2^12): the losses, the offset pass and the offset
    are all scaled; the optimizer's unscaled gradients and the trained model equal the unscaled run's. The second
    refresh measures the reliability of the first offset, which must be compared at the same (true) scale."""
    data = SyntheticImages(96)
    kw = dict(max_steps=3, offset_period="2", offset_reliability=True, max_grad_norm=0.0)
    scaled, scaled_capture = _trainer(tmp_path / "scaled", data, **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    scaled.accelerator.scaler = scaler  # the optimizer that `train` prepares steps through it
    scaled.train()
    assert scaled.optimizer.scaler is scaler
    assert scaled_capture.scales == [2.0**10, 2.0**11, 2.0**12] and scaler.get_scale() == 2.0**13
    plain, plain_capture = _trainer(tmp_path / "plain", data, **kw)
    plain.train()
    assert plain_capture.scales == [1.0] * 3
    for step, (g_scaled, g_plain) in enumerate(zip(scaled_capture.grads, plain_capture.grads)):
        for a, b in zip(g_scaled, g_plain):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9, msg=f"step {step}")
    for a, b in zip(scaled.model.parameters(), plain.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
    # the offsets (second refresh: reliability of the first one) are those of the unscaled run
    for block, ref in zip(scaled.offset.state.blocks, plain.offset.state.blocks):
        assert block.log_record() == pytest.approx(ref.log_record(), rel=1e-6, abs=1e-9)
        for d, d_ref in zip(block.unscaled_delta() or [], ref.unscaled_delta() or []):
            torch.testing.assert_close(d, d_ref, rtol=1e-6, atol=1e-9)
    assert any(0.0 < b.reliability < 1.0 for b in plain.offset.state.blocks)


def test_an_overflowing_offset_pass_is_rerun_unscaled(tmp_path, monkeypatch):
    data = SyntheticImages(64)
    plain, _ = _trainer(tmp_path / "plain", data, max_steps=1)
    plain._refresh_offset()
    trainer, _ = _trainer(tmp_path / "scaled", data, max_steps=1)
    # a stand-in scaler whose scale (past fp32's range) makes every scaled loss inf
    trainer.accelerator.scaler = SimpleNamespace(
        get_scale=lambda: 2.0**130, is_enabled=lambda: True, scale=lambda t: t
    )
    calls: list[tuple[float, bool]] = []
    original = controller_module.compute_offsets

    def counting(*args, **kwargs):
        offsets, record = original(*args, **kwargs)
        calls.append((kwargs["loss_scale"], offsets is None))
        return offsets, record

    monkeypatch.setattr(controller_module, "compute_offsets", counting)
    trainer._refresh_offset()
    assert calls == [(2.0**130, True), (1.0, False)]
    for block, ref in zip(trainer.offset.state.blocks, plain.offset.state.blocks):
        for d, d_ref in zip(block.unscaled_delta() or [], ref.unscaled_delta() or []):
            torch.testing.assert_close(d, d_ref)
